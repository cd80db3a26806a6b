"""The featurize stage: a reduce (one pass over the pool's ids: its shards, the bank, the curvature
sample), a map over shards (per-pair features), a reduce (the curvature statistics). The shards are whole
row groups of the ``pairs`` parts in storage order, so every pair's bytes are read once per run (the bank's
pairs once more). Resumes at shard granularity: a shard whose part exists is skipped, and a resumed run
writes the same bytes."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import torch

from ..errors import IncompatibleFeaturesError
from ..platform.features import (feature_parts, load_bank, load_curvature, load_pre, load_shard_plan, read_feature_part,
                                 relative_path, remove_run_outputs, save_bank, save_curvature, save_pre, save_shard_plan,
                                 shard_parts, write_features)
from ..platform.poolscan import PoolScan, PoolShard
from ..platform.provenance import interrupted_run, new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel
from ..scoring.featurize import Featurizer, ReferenceBank, ScoringContext, forward_pre_batches
from ..scoring.identity import StreamSample
from ..scoring.target import curvature_stats_pre
from ..util import progress as progress_bar, usable_cores
from .common import (MapShards, WriteBehind, endpoint_for, featurize_workers, input_batches, load_pairs, local_map,
                     model_fields, model_inputs, require_bank_model, require_pairs)
from .runconfig import RunConfig

log = logging.getLogger("chips")


def build_bank(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, pool_ids: list[str]) -> ReferenceBank:
    """The reference bank of a pool given as ids: ``cfg.bank.size`` pairs drawn by seeded key, forwarded once
    (the check stage; featurize draws the same bank in its one pass over the pool, :func:`featurize_prepare`)."""
    bank_ids = ReferenceBank.draw_ids(pool_ids, cfg.bank)
    return _bank(cfg, loaded, *load_pairs(wh, bank_ids, loaded), bank_ids)


def _bank(cfg: RunConfig, loaded: LoadedModel, images, texts, bank_ids: list[str]) -> ReferenceBank:
    return ReferenceBank.from_pairs(endpoint_for(cfg, loaded), images, texts, bank_ids,
                                    model_checksum=loaded.checksum, seed=cfg.bank.seed,
                                    micro_batch=cfg.featurize.micro_batch, mask_same_caption=cfg.bank.mask_same_caption,
                                    mask_image_cosine=cfg.bank.mask_image_cosine)


@dataclass
class FeaturizePlan:
    """What the shards need: the pool's shards (whole row groups of ``pairs`` parts), how many pool pairs,
    and the curvature sample's ids (each shard keeps its sample pairs' trunk outputs for the reduce)."""

    scan: PoolScan
    shards: list[PoolShard]
    pairs: int
    curvature_ids: list[str]
    reused: dict[int, str] = field(default_factory=dict)  # shard -> an earlier run's part (a refresh's unchanged shards)
    base: str | None = None  # the featurize run a refresh builds on (its bank, its parts, maybe its curvature)
    base_pairs: int = 0  # that run's pool size
    reason: str | None = None  # why a refresh could not build on the run it was given


def featurize_prepare(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str,
                      reuse: str | None = None) -> FeaturizePlan:
    """Reduce step, one pass over the pool's ids (no image bytes): its shards, the bank and curvature samples
    (the pairs of smallest seeded key, order- and shard-free), then the bank forwarded and stored once per run
    (a resumed run reuses the stored bank). With ``reuse`` (a refresh), the earlier run's bank is kept and each
    shard whose pairs are unchanged (same rows, same ids) reuses that run's features part instead of being
    forwarded, unless the model or the feature settings changed (then every pair is forwarded, and the log and
    the run's diagnostics say why)."""
    scan = PoolScan(wh, [s.name for s in cfg.pool])
    bank = StreamSample(cfg.bank.size, cfg.bank.seed, pa.concat_tables)
    curv = StreamSample(cfg.curvature.n_curv, cfg.curvature.seed)
    seen = [0]

    def offer(ids: list[str], where: pa.Table) -> None:
        seen[0] += len(ids)
        bank.offer(ids, where)
        curv.offer(ids)

    shards = scan.plan(cfg.shard_size, offer)
    if seen[0] < 2:
        require_pairs(wh, cfg.pool, "pool", ids=False)  # its error names the sources and their quarantine causes
    base, reason = _reusable(cfg, wh, loaded, reuse)
    plan_rows = [{"shard": f"shard-{n:05d}", "path": relative_path(wh, sh.path), "row_groups": list(sh.row_groups),
                  "start": sh.start, "stop": sh.stop, "pairs": sh.pairs, "digest": sh.digest, "reused_part": None}
                 for n, sh in enumerate(shards)]
    stored = load_shard_plan(wh, run_id)
    if stored is not None and [_shard_key(r) for r in stored.to_pylist()] != [_shard_key(r) for r in plan_rows]:
        # a resumed run whose pool changed meanwhile: what it wrote belongs to other shards
        log.warning("featurize run %s: the pool changed since it was interrupted; every shard is forwarded again",
                    run_id)
        remove_run_outputs(wh, run_id)
    try:
        load_bank(wh, run_id)
    except FileNotFoundError:
        if base is not None:  # the bank is drawn once per pool and model, then kept
            save_bank(wh, load_bank(wh, base), run_id)
        else:
            rows = scan.read_located(bank.payload)
            save_bank(wh, _bank(cfg, loaded, *model_inputs(rows, loaded), bank.ids), run_id)
    plan = FeaturizePlan(scan, shards, seen[0], curv.ids, reason=reason)
    if base is not None:
        before = load_shard_plan(wh, base).to_pylist()
        parts = {name: relative_path(wh, p) for name, p in shard_parts(wh, base).items()}
        where = {(r["path"], tuple(r["row_groups"]), r["start"], r["stop"], r["digest"]): parts.get(r["shard"])
                 for r in before}
        for n, r in enumerate(plan_rows):
            part = where.get((r["path"], tuple(r["row_groups"]), r["start"], r["stop"], r["digest"]))
            if part is not None:
                r["reused_part"], plan.reused[n] = part, part
        plan.base, plan.base_pairs = base, sum(r["pairs"] for r in before)
    save_shard_plan(wh, run_id, plan_rows)
    return plan


def _shard_key(row: dict) -> tuple:
    """What a shard holds (not where a refresh found its features)."""
    return row["shard"], row["path"], tuple(row["row_groups"]), row["start"], row["stop"], row["pairs"], row["digest"]


def _reusable(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, reuse: str | None) -> tuple[str | None, str | None]:
    """``reuse`` when a refresh can build on it: the same model, the same feature identity, a kept shard plan.
    Otherwise None, with one log line saying why every pair is forwarded again."""
    if reuse is None:
        return None, None
    why = None
    try:
        bank = load_bank(wh, reuse)
    except FileNotFoundError:
        bank, why = None, f"featurize run {reuse!r} has no stored bank"
    if bank is not None and bank.model_checksum != loaded.checksum:
        why = (f"the model changed: featurize run {reuse!r} was made with model {bank.model_checksum[:12]}, the loaded "
               f"{loaded.label} is {loaded.checksum[:12]}")
    elif bank is not None and load_shard_plan(wh, reuse) is None:
        why = f"featurize run {reuse!r} kept no shard plan (made before refreshes reused features)"
    elif bank is not None:
        stored = read_feature_part(wh, feature_parts(wh, reuse)[0]).identity
        try:  # another precision is refused by the bank itself, other settings by the identities
            ours = Featurizer(endpoint_for(cfg, loaded), bank, cfg.sketch, cfg.featurize).identity
            ours.require_same(stored, f"featurize run {reuse!r}")
        except IncompatibleFeaturesError as e:
            why = f"the feature settings changed: {e}"
    if why:
        log.warning("refresh: %s; every pool pair is featurized again", why)
        return None, why
    return reuse, None


def featurize_shard(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, plan: FeaturizePlan, n: int,
                    shard: PoolShard, writer: WriteBehind | None = None) -> bool:
    """Map step: one shard's features (and its curvature-sample pairs' trunk outputs); skipped (False) when
    its part already exists. With ``writer`` the outputs are written on its thread (the call returns first)."""
    name = f"shard-{n:05d}"
    if n in plan.reused or wh.has_part("features", {"run": run_id}, name):
        return False
    bank = load_bank(wh, run_id)
    require_bank_model(loaded, bank, run_id)
    feat = Featurizer(endpoint_for(cfg, loaded), bank, cfg.sketch, cfg.featurize)
    rows = plan.scan.read(shard)
    ids = rows.column("pair_id").to_pylist()
    mb = cfg.featurize.micro_batch
    h_v, h_t = forward_pre_batches(feat.endpoint, input_batches(rows, loaded, mb, featurize_workers(cfg, loaded)), mb)
    del rows
    wanted = set(plan.curvature_ids)
    keep = [i for i, p in enumerate(ids) if p in wanted]
    if writer is not None:
        writer.wait()  # the previous shard's part, written during this shard's forward: one shard's outputs in memory
    pre = ([ids[i] for i in keep], h_v[keep], h_t[keep])
    features = feat.featurize_pre(h_v, h_t, ids)
    del h_v, h_t

    def write() -> None:
        save_pre(wh, run_id, name, *pre)
        write_features(wh, features, run_id, name)  # last: the features part's presence marks the shard complete

    if writer is None:
        write()
    else:
        writer.submit(write)
    return True


def featurize_curvature(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, plan: FeaturizePlan) -> None:
    """Reduce step: Φ_pos, Φ_neg and the Fisher over the seeded sample, from the trunk outputs the shards kept,
    stored once per run."""
    try:
        load_curvature(wh, run_id)
        return
    except FileNotFoundError:
        pass
    if _reuses_curvature(cfg, plan):
        save_curvature(wh, load_curvature(wh, plan.base), run_id)
        return
    ctx = ScoringContext(endpoint_for(cfg, loaded), load_bank(wh, run_id), cfg.sketch)
    ids = plan.curvature_ids
    kept = load_pre(wh, run_id, ids, missing_ok=True)  # sample pairs in the shards forwarded now
    missing = [p for p in ids if p not in kept]
    if missing:  # sample pairs in shards a refresh reused: forwarded here, once
        mb = cfg.featurize.micro_batch
        h_v, h_t = forward_pre_batches(ctx.endpoint, input_batches(wh.read_pairs(missing), loaded, mb,
                                                                   featurize_workers(cfg, loaded)), mb)
        kept |= {p: (h_v[i], h_t[i]) for i, p in enumerate(missing)}
    h_v, h_t = torch.stack([kept[p][0] for p in ids]), torch.stack([kept[p][1] for p in ids])
    save_curvature(wh, curvature_stats_pre(ctx, h_v, h_t, ids, cfg.curvature, cfg.featurize.micro_batch), run_id)


def _growth(plan: FeaturizePlan) -> float:
    """How much the pool grew since the run a refresh builds on, as a fraction of its size then."""
    return (plan.pairs - plan.base_pairs) / max(plan.base_pairs, 1)


def _reuses_curvature(cfg: RunConfig, plan: FeaturizePlan) -> bool:
    """A refresh keeps the earlier run's curvature until the pool has grown past ``refresh.recompute_curvature_after``."""
    return plan.base is not None and _growth(plan) <= cfg.refresh.recompute_curvature_after


def _warn_oversubscribed(workers: int, loaded: LoadedModel) -> None:
    """On CPU, decode workers and the model's torch threads share the cores: more of both than cores slows the
    forward several times over (measured: docs/benchmarks/featurize_shards.md)."""
    cores = usable_cores()
    if workers and not str(loaded.device).startswith("cuda") and workers + torch.get_num_threads() > cores:
        log.warning("featurize.num_workers=%d beside %d torch threads on %d cores: the decoders and the model "
                    "may compete for them (a forward several times slower); if so, give the model fewer threads "
                    "(torch.set_num_threads, OMP_NUM_THREADS) or use fewer workers", workers, torch.get_num_threads(), cores)


def featurize_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str | None = None,
                    parent_run_id: str | None = None, progress: bool = False,
                    map_shards: MapShards = local_map, reuse: str | None = None) -> dict:
    """Bank, per-shard features and the curvature statistics for every pool pair. ``map_shards``
    decides where the shards run (in this process by default). ``reuse``: an earlier featurize run of this pool
    that a refresh builds on (:func:`featurize_prepare`): only the shards that changed are forwarded."""
    resumed = interrupted_run(wh, "featurize", cfg, model_checksum=loaded.checksum) if run_id is None else None
    if resumed:  # a rerun of the command that was killed or stopped: its finished shards are kept
        log.info("featurize: resuming run %s (%s); its finished shards are kept", *resumed)
    run_id = resumed[0] if resumed else run_id or new_run_id("featurize")
    with recorded_run(wh, "featurize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      **model_fields(cfg, loaded)) as row:
        plan = featurize_prepare(cfg, wh, loaded, run_id, reuse)
        shards = plan.shards
        _warn_oversubscribed(featurize_workers(cfg, loaded), loaded)
        # in this process a shard's part is written while the next shard runs; an orchestrator's shard task
        # writes its own before it returns (its retries and the run's resume count on the part being there)
        writer = WriteBehind() if map_shards is local_map else None
        try:
            results = map_shards(partial(featurize_shard, cfg, wh, loaded, run_id, plan, writer=writer), shards)
            written = sum(bool(r) for r in progress_bar(results, enabled=progress, desc="featurize", total=len(shards)))
            if writer is not None:
                writer.wait()  # every part written before the curvature reads them
        finally:
            if writer is not None:
                writer.close()
        featurize_curvature(cfg, wh, loaded, run_id, plan)
        bank = load_bank(wh, run_id)
        bank_size, n = len(bank.pair_ids), plan.pairs
        if bank_size < cfg.bank.size:
            log.warning("bank.size=%d clipped to the pool's %d pairs (K=%d)", cfg.bank.size, n, bank_size)
        refresh = _refresh_summary(cfg, plan, reuse)
        row.update(bank_id=bank.bank_id, rows_in=n, rows_out=n, rows_quarantined=0,
                   input_fingerprints=json.dumps({"pool_pairs": n}),
                   diagnostics_json=json.dumps({"bank_size": bank_size, "bank_size_configured": cfg.bank.size,
                                                **({"refresh": refresh} if refresh else {}),
                                                **({"resumed": {"was": resumed[1], "shards_written_now": written}}
                                                   if resumed else {})}))
    out = {"run_id": run_id, "pairs": n, "shards": len(shards), "shards_written": written,
           "bank_id": bank.bank_id, "bank_size": bank_size}
    return out | ({"refresh": refresh} if refresh else {})


def _refresh_summary(cfg: RunConfig, plan: FeaturizePlan, reuse: str | None) -> dict | None:
    """What a refresh reused and forwarded, and why (recorded in the runs row)."""
    if reuse is None:
        return None
    if plan.base is None:
        return {"reuse_of": reuse, "reused": False, "reason": plan.reason,
                "pairs_reused": 0, "pairs_forwarded": plan.pairs}
    reused_pairs = sum(plan.shards[n].pairs for n in plan.reused)
    return {"reuse_of": plan.base, "reused": True, "shards_reused": len(plan.reused),
            "shards_forwarded": len(plan.shards) - len(plan.reused), "pairs_reused": reused_pairs,
            "pairs_forwarded": plan.pairs - reused_pairs, "pool_growth": round(_growth(plan), 6),
            "curvature": "reused" if _reuses_curvature(cfg, plan) else "recomputed",
            "recompute_curvature_after": cfg.refresh.recompute_curvature_after}
