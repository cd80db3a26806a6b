"""What a featurization run leaves in the warehouse: feature parts (pair x run, float16, the feature
identity in the footer), and beside the tables under ``globals/run=<run_id>/`` the reference bank and
the curvature statistics, so that a later score — or a rescore for a new target — reuses them
instead of running the model over the pool again."""
from __future__ import annotations

import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..scoring.featurize import FeatureBatch, ReferenceBank
from ..scoring.identity import FeatureIdentity
from ..scoring.target import CurvatureStats
from .warehouse import Warehouse


def _globals(wh: Warehouse, run_id: str, name: str) -> str:
    return wh.path("globals", f"run={run_id}", name)


def save_bank(wh: Warehouse, bank: ReferenceBank, run_id: str) -> None:
    t = pa.table({"pair_id": bank.pair_ids, "h_v": list(bank.h_v.float().numpy()), "h_t": list(bank.h_t.float().numpy())})
    meta = {"model_checksum": bank.model_checksum, "seed": str(bank.seed), "bank_id": bank.bank_id,
            "masking": json.dumps(bank.masking)}
    buf = io.BytesIO()
    pq.write_table(t.replace_schema_metadata(meta), buf)
    wh.write_bytes(_globals(wh, run_id, "bank.parquet"), buf.getvalue())


def load_bank(wh: Warehouse, run_id: str) -> ReferenceBank:
    t = pq.read_table(io.BytesIO(wh.read_bytes(_globals(wh, run_id, "bank.parquet"))))
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    masking = json.loads(meta.get("masking", "{}"))  # absent: a bank stored before masking existed
    bank = ReferenceBank(t.column("pair_id").to_pylist(), torch.tensor(np.stack(t.column("h_v").to_numpy(zero_copy_only=False))),
                         torch.tensor(np.stack(t.column("h_t").to_numpy(zero_copy_only=False))),
                         meta["model_checksum"], int(meta["seed"]), bool(masking.get("same_caption", False)),
                         masking.get("image_cosine"))
    if bank.bank_id != meta["bank_id"]:
        raise ValueError(f"stored bank of run {run_id!r} does not hash to its recorded id {meta['bank_id']!r}")
    return bank


def save_curvature(wh: Warehouse, curv: CurvatureStats, run_id: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, phi_pos=curv.phi_pos, phi_neg=curv.phi_neg, fisher=curv.fisher,
             meta=np.array(json.dumps({"n": curv.n, "hard_negatives": curv.hard_negatives,
                                       "sample_seed": curv.sample_seed, "identity": curv.identity.to_json()})))
    wh.write_bytes(_globals(wh, run_id, "curvature.npz"), buf.getvalue())


def load_curvature(wh: Warehouse, run_id: str) -> CurvatureStats:
    z = np.load(io.BytesIO(wh.read_bytes(_globals(wh, run_id, "curvature.npz"))))
    meta = json.loads(str(z["meta"]))
    return CurvatureStats(z["phi_pos"], z["phi_neg"], z["fisher"], meta["n"], meta["hard_negatives"],
                          meta["sample_seed"], FeatureIdentity.from_json(meta["identity"]))


def write_features(wh: Warehouse, features: FeatureBatch, run_id: str, shard: str) -> str:
    """One shard of a featurization run: float16 vectors, the feature identity in the footer."""
    return wh.write("features", features.to_arrow("float16"), {"run": run_id}, shard)


def read_features(wh: Warehouse, run_id: str) -> FeatureBatch:
    """All shards of a featurization run as one :class:`FeatureBatch`, in pair-id order; parts whose
    identity (model checksum, bank id, sketch seed, k) differs raise ``IncompatibleFeaturesError``."""
    parts = sorted(wh.fs.glob(posixpath.join(wh.table_dir("features"), f"run={run_id}", "*.parquet")))
    if not parts:
        raise FileNotFoundError(f"no features for run {run_id!r} in warehouse {wh.url!r}")
    out = FeatureBatch.concat([FeatureBatch.from_arrow(pq.read_table(io.BytesIO(wh.read_bytes(p)))) for p in parts])
    return out.take(np.argsort(np.asarray(out.pair_id, dtype=str), kind="stable"))
