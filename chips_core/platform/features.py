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
            "masking": json.dumps(bank.masking), "precision": bank.precision}
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
                         masking.get("image_cosine"), meta.get("precision", "fp32"))
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


def save_direction(wh: Warehouse, score_run_id: str, v: np.ndarray, featurize_run_id: str) -> None:
    """What a set-aware selection (scoring/select.py) needs of a score run besides its scores: the preconditioned
    target direction ``M^-1 u`` and the featurize run whose features it scored."""
    buf = io.BytesIO()
    np.savez(buf, v=np.asarray(v, dtype=np.float64), featurize_run_id=np.array(featurize_run_id))
    wh.write_bytes(_globals(wh, score_run_id, "direction.npz"), buf.getvalue())


def load_direction(wh: Warehouse, score_run_id: str) -> tuple[np.ndarray, str]:
    path = _globals(wh, score_run_id, "direction.npz")
    if not wh.fs.exists(path):
        raise FileNotFoundError(f"score run {score_run_id!r} has no stored target direction ({path}); it predates "
                                "the set-aware selectors: score again to use them")
    z = np.load(io.BytesIO(wh.read_bytes(path)))
    return z["v"], str(z["featurize_run_id"])


def save_pre(wh: Warehouse, run_id: str, shard: str, pair_ids: list[str], h_v: torch.Tensor, h_t: torch.Tensor) -> None:
    """A shard's curvature-sample pairs' trunk outputs (float32, exact), for the curvature reduce: the sample is
    forwarded once, inside its shards, not read again."""
    def vec(h: torch.Tensor) -> pa.FixedSizeListArray:
        a = h.detach().to("cpu", torch.float32).numpy()
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), a.shape[1])
    t = pa.table({"pair_id": pa.array(pair_ids, pa.string()), "h_v": vec(h_v), "h_t": vec(h_t)})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    wh.write_bytes(_globals(wh, run_id, f"pre/{shard}.parquet"), buf.getvalue())


def load_pre(wh: Warehouse, run_id: str, pair_ids: list[str], missing_ok: bool = False):
    """The stored trunk outputs of ``pair_ids``, in that order (a missing one is a named error); with
    ``missing_ok``, a dict ``{pair_id: (h_v, h_t)}`` of those stored."""
    parts = sorted(wh.fs.glob(_globals(wh, run_id, "pre/*.parquet")))
    t = pa.concat_tables([pq.read_table(io.BytesIO(wh.read_bytes(p))) for p in parts]) if parts else None
    have = {} if t is None else {p: i for i, p in enumerate(t.column("pair_id").to_pylist())}
    missing = [p for p in pair_ids if p not in have]
    if missing and not missing_ok:
        raise KeyError(f"featurize run {run_id!r} kept no trunk outputs for {len(missing)} curvature-sample pairs, "
                       f"e.g. {missing[:3]}")
    found = [p for p in pair_ids if p in have]
    idx = np.array([have[p] for p in found], dtype=np.int64)

    def mat(name: str) -> torch.Tensor:
        col = t.column(name).combine_chunks()
        return torch.from_numpy(col.flatten().to_numpy().reshape(len(col), -1)[idx].copy())
    if not missing_ok:
        return mat("h_v"), mat("h_t")
    if not found:
        return {}
    h_v, h_t = mat("h_v"), mat("h_t")
    return {p: (h_v[i], h_t[i]) for i, p in enumerate(found)}


def write_features(wh: Warehouse, features: FeatureBatch, run_id: str, shard: str) -> str:
    """One shard of a featurization run: float16 vectors, the feature identity in the footer."""
    # the vectors are float16 noise to a compressor: stored plain (fast to read), the rest zstd
    return wh.write("features", features.to_arrow("float16"), {"run": run_id}, shard,
                    compression={v: "none" for v in FeatureBatch.VECTORS})


def feature_parts(wh: Warehouse, run_id: str) -> list[str]:
    """The parts of a featurization run (one per featurize shard), in shard order: its own, and the parts of an
    earlier run that a refresh reused for shards whose pairs had not changed (named by its shard plan)."""
    by_name = shard_parts(wh, run_id)
    if not by_name:
        raise FileNotFoundError(f"no features for run {run_id!r} in warehouse {wh.url!r}")
    return [by_name[k] for k in sorted(by_name)]


def shard_parts(wh: Warehouse, run_id: str) -> dict[str, str]:
    """``{shard name: features part path}`` of a run, reused parts included."""
    own = wh.fs.glob(posixpath.join(wh.table_dir("features"), f"run={run_id}", "*.parquet"))
    by_name = {posixpath.basename(p)[:-len(".parquet")]: p for p in own}
    plan = load_shard_plan(wh, run_id)
    if plan is not None:
        for name, part in zip(plan.column("shard").to_pylist(), plan.column("reused_part").to_pylist()):
            if part is not None:
                by_name[name] = wh.path(part)
    return by_name


SHARD_PLAN = pa.schema([("shard", pa.string()), ("path", pa.string()), ("row_groups", pa.list_(pa.int32())),
                        ("start", pa.int64()), ("stop", pa.int64()), ("pairs", pa.int64()), ("digest", pa.string()),
                        ("reused_part", pa.string())])


def save_shard_plan(wh: Warehouse, run_id: str, rows: list[dict]) -> None:
    """Where each shard of a featurize run came from (its ``pairs`` part, row groups, range, the sha256 of its pair
    ids) and, for a shard a refresh did not forward, the earlier run's part it reuses (warehouse-relative paths)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_PLAN), buf)
    wh.write_bytes(_globals(wh, run_id, "shards.parquet"), buf.getvalue())


def load_shard_plan(wh: Warehouse, run_id: str) -> pa.Table | None:
    """A featurize run's shard plan, or None for a run made before plans were kept."""
    path = _globals(wh, run_id, "shards.parquet")
    if not wh.fs.exists(path):
        return None
    return pq.read_table(io.BytesIO(wh.read_bytes(path)))


def remove_run_outputs(wh: Warehouse, run_id: str) -> None:
    """Everything a featurize run stored (its features parts, bank, trunk outputs, curvature, shard plan)."""
    for folder in (posixpath.join(wh.table_dir("features"), f"run={run_id}"), wh.path("globals", f"run={run_id}")):
        if wh.fs.exists(folder):
            wh.fs.rm(folder, recursive=True)


def relative_path(wh: Warehouse, path: str) -> str:
    """``path`` relative to the warehouse root (what a shard plan stores, so that the warehouse can move)."""
    return posixpath.relpath(path, wh.root) if path.startswith(wh.root) else path


def read_feature_part(wh: Warehouse, path: str) -> FeatureBatch:
    """One part of a featurization run, in its stored (pool storage) order; vectors as stored (float16)."""
    if wh.is_local:  # memory-mapped: the stored float16 vectors are used in place, never copied
        return FeatureBatch.from_arrow(pq.read_table(path, memory_map=True), dtype=None)
    with wh.fs.open(path, "rb") as f:
        return FeatureBatch.from_arrow(pq.read_table(f), dtype=None)


def iter_features(wh: Warehouse, run_id: str):
    """The run's features part by part (memory of one part, whatever the pool's size); parts whose identity
    differs from the first's raise ``IncompatibleFeaturesError``."""
    first = None
    for path in feature_parts(wh, run_id):
        batch = read_feature_part(wh, path)
        if first is None:
            first = batch.identity
        first.require_same(batch.identity, "feature batches")
        yield path, batch


def read_features(wh: Warehouse, run_id: str) -> FeatureBatch:
    """All shards of a featurization run as one :class:`FeatureBatch`, in pair-id order; parts whose
    identity (model checksum, bank id, sketch seed, k) differs raise ``IncompatibleFeaturesError``.
    This holds the whole run in memory: the stages read it part by part (:func:`iter_features`)."""
    out = FeatureBatch.concat([b for _, b in iter_features(wh, run_id)])
    return out.take(np.argsort(np.asarray(out.pair_id, dtype=str), kind="stable"))
