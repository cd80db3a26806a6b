"""The featurize stage: a reduce (the reference bank), a map over shards (per-pair features), a
reduce (the curvature statistics). Resumes at shard granularity: a shard whose part exists is
skipped, and a resumed run writes the same bytes."""
from __future__ import annotations

import json
import logging
from functools import partial
from typing import Sequence

from ..platform.features import load_bank, load_curvature, save_bank, save_curvature, write_features
from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import EndpointModel, LoadedModel
from ..scoring.featurize import Featurizer, ReferenceBank, ScoringContext
from ..scoring.target import curvature_sample, curvature_stats
from ..util import progress as progress_bar
from .common import MapShards, load_pairs, local_map, model_fields, require_bank_model, require_pairs
from .runconfig import RunConfig

log = logging.getLogger("chips")


def build_bank(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, pool_ids: list[str]) -> ReferenceBank:
    """The reference bank of a pool: ``cfg.bank.size`` pairs drawn by seeded key, forwarded once."""
    bank_ids = ReferenceBank.draw_ids(pool_ids, cfg.bank)
    return ReferenceBank.from_pairs(EndpointModel(loaded.model), *load_pairs(wh, bank_ids, loaded), bank_ids,
                                    model_checksum=loaded.checksum, seed=cfg.bank.seed,
                                    micro_batch=cfg.featurize.micro_batch, mask_same_caption=cfg.bank.mask_same_caption,
                                    mask_image_cosine=cfg.bank.mask_image_cosine)


def featurize_prepare(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str) -> tuple[list[str], list[list[str]]]:
    """Reduce step: the pool's pair ids, their shards, and the reference bank (drawn, forwarded and
    stored once per run; a resumed run reuses the stored bank)."""
    ids = require_pairs(wh, cfg.pool, "pool")
    try:
        load_bank(wh, run_id)
    except FileNotFoundError:
        save_bank(wh, build_bank(cfg, wh, loaded, ids), run_id)
    return ids, [ids[i:i + cfg.shard_size] for i in range(0, len(ids), cfg.shard_size)]


def featurize_shard(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, n: int,
                    shard_ids: Sequence[str]) -> bool:
    """Map step: one shard's features; skipped (False) when its part already exists."""
    name = f"shard-{n:05d}"
    if wh.has_part("features", {"run": run_id}, name):
        return False
    bank = load_bank(wh, run_id)
    require_bank_model(loaded, bank, run_id)
    feat = Featurizer(EndpointModel(loaded.model), bank, cfg.sketch, cfg.featurize)
    write_features(wh, feat.featurize(*load_pairs(wh, shard_ids, loaded), list(shard_ids)), run_id, name)
    return True


def featurize_curvature(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, ids: list[str]) -> None:
    """Reduce step: Φ_pos, Φ_neg and the Fisher over the seeded sample, stored once per run."""
    try:
        load_curvature(wh, run_id)
    except FileNotFoundError:
        ctx = ScoringContext(EndpointModel(loaded.model), load_bank(wh, run_id), cfg.sketch)
        sample = curvature_sample(ids, cfg.curvature)
        save_curvature(wh, curvature_stats(ctx, *load_pairs(wh, sample, loaded), sample, cfg.curvature,
                                           cfg.featurize), run_id)


def featurize_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str | None = None,
                    parent_run_id: str | None = None, progress: bool = False,
                    map_shards: MapShards = local_map) -> dict:
    """Bank, per-shard features and the curvature statistics for every pool pair. ``map_shards``
    decides where the shards run (in this process by default)."""
    run_id = run_id or new_run_id("featurize")
    with recorded_run(wh, "featurize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      **model_fields(cfg, loaded)) as row:
        ids, shards = featurize_prepare(cfg, wh, loaded, run_id)
        results = map_shards(partial(featurize_shard, cfg, wh, loaded, run_id), shards)
        written = sum(bool(r) for r in progress_bar(results, enabled=progress, desc="featurize", total=len(shards)))
        featurize_curvature(cfg, wh, loaded, run_id, ids)
        bank = load_bank(wh, run_id)
        bank_size = len(bank.pair_ids)
        if bank_size < cfg.bank.size:
            log.warning("bank.size=%d clipped to the pool's %d pairs (K=%d)", cfg.bank.size, len(ids), bank_size)
        row.update(bank_id=bank.bank_id, rows_in=len(ids), rows_out=len(ids), rows_quarantined=0,
                   input_fingerprints=json.dumps({"pool_pairs": len(ids)}),
                   diagnostics_json=json.dumps({"bank_size": bank_size, "bank_size_configured": cfg.bank.size}))
    return {"run_id": run_id, "pairs": len(ids), "shards": len(shards), "shards_written": written,
            "bank_id": bank.bank_id, "bank_size": bank_size}
