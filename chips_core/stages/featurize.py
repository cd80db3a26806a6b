"""The featurize stage: a reduce (one pass over the pool's ids: its shards, the bank, the curvature
sample), a map over shards (per-pair features), a reduce (the curvature statistics). The shards are whole
row groups of the ``pairs`` parts in storage order, so every pair's bytes are read once per run (the bank's
pairs once more). Resumes at shard granularity: a shard whose part exists is skipped, and a resumed run
writes the same bytes."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import torch

from ..platform.features import (load_bank, load_curvature, load_pre, save_bank, save_curvature, save_pre,
                                 write_features)
from ..platform.poolscan import PoolScan, PoolShard
from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel
from ..scoring.featurize import Featurizer, ReferenceBank, ScoringContext, forward_pre_batches
from ..scoring.identity import StreamSample
from ..scoring.target import curvature_stats_pre
from ..util import progress as progress_bar
from .common import (MapShards, endpoint_for, featurize_workers, input_batches, load_pairs, local_map, model_fields,
                     model_inputs, require_bank_model, require_pairs)
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


def featurize_prepare(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str) -> FeaturizePlan:
    """Reduce step, one pass over the pool's ids (no image bytes): its shards, the bank and curvature samples
    (the pairs of smallest seeded key, order- and shard-free), then the bank forwarded and stored once per run
    (a resumed run reuses the stored bank)."""
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
    try:
        load_bank(wh, run_id)
    except FileNotFoundError:
        rows = scan.read_located(bank.payload)
        save_bank(wh, _bank(cfg, loaded, *model_inputs(rows, loaded), bank.ids), run_id)
    return FeaturizePlan(scan, shards, seen[0], curv.ids)


def featurize_shard(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, plan: FeaturizePlan, n: int,
                    shard: PoolShard) -> bool:
    """Map step: one shard's features (and its curvature-sample pairs' trunk outputs); skipped (False) when
    its part already exists."""
    name = f"shard-{n:05d}"
    if wh.has_part("features", {"run": run_id}, name):
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
    save_pre(wh, run_id, name, [ids[i] for i in keep], h_v[keep], h_t[keep])
    # the features part goes last: its presence marks the shard complete
    write_features(wh, feat.featurize_pre(h_v, h_t, ids), run_id, name)
    return True


def featurize_curvature(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, plan: FeaturizePlan) -> None:
    """Reduce step: Φ_pos, Φ_neg and the Fisher over the seeded sample, from the trunk outputs the shards kept,
    stored once per run."""
    try:
        load_curvature(wh, run_id)
    except FileNotFoundError:
        ctx = ScoringContext(endpoint_for(cfg, loaded), load_bank(wh, run_id), cfg.sketch)
        h_v, h_t = load_pre(wh, run_id, plan.curvature_ids)
        save_curvature(wh, curvature_stats_pre(ctx, h_v, h_t, plan.curvature_ids, cfg.curvature,
                                               cfg.featurize.micro_batch), run_id)


def _warn_oversubscribed(workers: int, loaded: LoadedModel) -> None:
    """On CPU, decode workers and the model's torch threads share the cores: more of both than cores slows the
    forward several times over (measured: docs/benchmarks/featurize_shards.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers and not str(loaded.device).startswith("cuda") and workers + torch.get_num_threads() > cores:
        log.warning("featurize.num_workers=%d beside %d torch threads on %d cores: the decoders and the model "
                    "may compete for them (a forward several times slower); if so, give the model fewer threads "
                    "(torch.set_num_threads, OMP_NUM_THREADS) or use fewer workers", workers, torch.get_num_threads(), cores)


def featurize_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str | None = None,
                    parent_run_id: str | None = None, progress: bool = False,
                    map_shards: MapShards = local_map) -> dict:
    """Bank, per-shard features and the curvature statistics for every pool pair. ``map_shards``
    decides where the shards run (in this process by default)."""
    run_id = run_id or new_run_id("featurize")
    with recorded_run(wh, "featurize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      **model_fields(cfg, loaded)) as row:
        plan = featurize_prepare(cfg, wh, loaded, run_id)
        shards = plan.shards
        _warn_oversubscribed(featurize_workers(cfg, loaded), loaded)
        results = map_shards(partial(featurize_shard, cfg, wh, loaded, run_id, plan), shards)
        written = sum(bool(r) for r in progress_bar(results, enabled=progress, desc="featurize", total=len(shards)))
        featurize_curvature(cfg, wh, loaded, run_id, plan)
        bank = load_bank(wh, run_id)
        bank_size, n = len(bank.pair_ids), plan.pairs
        if bank_size < cfg.bank.size:
            log.warning("bank.size=%d clipped to the pool's %d pairs (K=%d)", cfg.bank.size, n, bank_size)
        row.update(bank_id=bank.bank_id, rows_in=n, rows_out=n, rows_quarantined=0,
                   input_fingerprints=json.dumps({"pool_pairs": n}),
                   diagnostics_json=json.dumps({"bank_size": bank_size, "bank_size_configured": cfg.bank.size}))
    return {"run_id": run_id, "pairs": n, "shards": len(shards), "shards_written": written,
            "bank_id": bank.bank_id, "bank_size": bank_size}
