"""The pipeline's stages over the warehouse: featurize, score, materialize (PLATFORM.md "Shape").

Each stage reads tables, writes tables per shard, and records one ``runs`` row. Global quantities
(the bank, the curvature statistics, the target statistics) are stored beside the tables under
``globals/run=<run_id>/`` so a later stage — or a rescore for a new target — reuses them instead
of running the model over the pool again. No orchestration imports here (see ``flows/``).
"""
from __future__ import annotations

import io
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .featurize import Featurizer, ReferenceBank, ScoringContext
from .identity import FeatureIdentity
from .models import EndpointModel, LoadedModel, load_model
from .provenance import new_run_id, recorded_run
from .runconfig import RunConfig
from .score import Preconditioners, score_features
from .stages import read_features, scores_table, subsets_table, write_features
from .target import CurvatureStats, curvature_sample, curvature_stats, target_stats
from .warehouse import Warehouse

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def image_preprocess(model):
    from open_clip.transform import image_transform

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size") or model.visual.image_size
    return image_transform(size, is_train=False, mean=cfg.get("mean", OPENAI_MEAN), std=cfg.get("std", OPENAI_STD))


def source_pair_ids(wh: Warehouse, sources) -> list[str]:
    """Distinct pair ids recorded under any of the named sources, sorted (the canonical order)."""
    names = [s.name for s in sources]
    t = wh.read("pair_sources", columns=["pair_id", "source"])
    t = t.filter(pc.is_in(t.column("source"), pa.array(names)))
    return sorted(set(t.column("pair_id").to_pylist()))


def load_pairs(wh: Warehouse, ids: list[str], loaded: LoadedModel):
    """Images (preprocessed) and tokenized captions for ``ids``, in the order of ``ids``."""
    from PIL import Image

    t = wh.read("pairs", columns=["pair_id", "caption", "image"], filter=pc.field("pair_id").isin(ids))
    rows = {r["pair_id"]: r for r in t.to_pylist()}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise KeyError(f"{len(missing)} pair ids not in the warehouse's pairs table, e.g. {missing[:3]}")
    prep = image_preprocess(loaded.model)
    images = torch.stack([prep(Image.open(io.BytesIO(rows[i]["image"])).convert("RGB")) for i in ids])
    return images, loaded.tokenizer([rows[i]["caption"] for i in ids])


# ---------------------------------------------------------------------------------------------
# Globals: bank and curvature, stored beside the tables

def _globals(wh: Warehouse, run_id: str, name: str) -> str:
    return posixpath.join(wh.root, "globals", f"run={run_id}", name)


def save_bank(wh: Warehouse, bank: ReferenceBank, run_id: str) -> None:
    t = pa.table({"pair_id": bank.pair_ids, "h_v": list(bank.h_v.float().numpy()), "h_t": list(bank.h_t.float().numpy())})
    meta = {"model_checksum": bank.model_checksum, "seed": str(bank.seed), "bank_id": bank.bank_id}
    _write_bytes(wh, _globals(wh, run_id, "bank.parquet"), _parquet_bytes(t.replace_schema_metadata(meta)))


def load_bank(wh: Warehouse, run_id: str) -> ReferenceBank:
    with wh.fs.open(_globals(wh, run_id, "bank.parquet"), "rb") as f:
        t = pq.read_table(f)
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    bank = ReferenceBank(t.column("pair_id").to_pylist(), torch.tensor(np.stack(t.column("h_v").to_numpy(zero_copy_only=False))),
                         torch.tensor(np.stack(t.column("h_t").to_numpy(zero_copy_only=False))),
                         meta["model_checksum"], int(meta["seed"]))
    if bank.bank_id != meta["bank_id"]:
        raise ValueError(f"stored bank of run {run_id!r} does not hash to its recorded id {meta['bank_id']!r}")
    return bank


def save_curvature(wh: Warehouse, curv: CurvatureStats, run_id: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, phi_pos=curv.phi_pos, phi_neg=curv.phi_neg, fisher=curv.fisher,
             meta=np.array(json.dumps({"n": curv.n, "hard_negatives": curv.hard_negatives,
                                       "sample_seed": curv.sample_seed, "identity": curv.identity.to_json()})))
    _write_bytes(wh, _globals(wh, run_id, "curvature.npz"), buf.getvalue())


def load_curvature(wh: Warehouse, run_id: str) -> CurvatureStats:
    with wh.fs.open(_globals(wh, run_id, "curvature.npz"), "rb") as f:
        z = np.load(io.BytesIO(f.read()))
    meta = json.loads(str(z["meta"]))
    return CurvatureStats(z["phi_pos"], z["phi_neg"], z["fisher"], meta["n"], meta["hard_negatives"],
                          meta["sample_seed"], FeatureIdentity.from_json(meta["identity"]))


def _parquet_bytes(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def _write_bytes(wh: Warehouse, path: str, data: bytes) -> None:
    wh.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
    with wh.fs.open(tmp, "wb") as f:
        f.write(data)
    wh.fs.mv(tmp, path)


# ---------------------------------------------------------------------------------------------
# Stages

def _model_fields(cfg: RunConfig, loaded: LoadedModel) -> dict:
    return {"model_name": loaded.label, "model_checksum": loaded.checksum, "sketch_seed": cfg.sketch.seed,
            "sketch_k": cfg.sketch.k}


def featurize_prepare(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str) -> tuple[list[str], list[list[str]]]:
    """Reduce step: the pool's pair ids, their shards, and the reference bank (drawn, forwarded and
    stored once per run; a resumed run reuses the stored bank)."""
    ids = source_pair_ids(wh, cfg.pool)
    if len(ids) < 2:
        raise ValueError(f"pool sources {[s.name for s in cfg.pool]} hold {len(ids)} pairs; need at least 2")
    try:
        load_bank(wh, run_id)
    except FileNotFoundError:
        bank_ids = ReferenceBank.draw_ids(ids, cfg.bank)
        bank = ReferenceBank.from_pairs(EndpointModel(loaded.model), *load_pairs(wh, bank_ids, loaded), bank_ids,
                                        model_checksum=loaded.checksum, seed=cfg.bank.seed,
                                        micro_batch=cfg.featurize.micro_batch)
        save_bank(wh, bank, run_id)
    return ids, [ids[i:i + cfg.shard_size] for i in range(0, len(ids), cfg.shard_size)]


def featurize_shard(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str, n: int,
                    shard_ids: list[str]) -> bool:
    """Map step: one shard's features; skipped (False) when its part already exists."""
    name = f"shard-{n:05d}"
    if wh.has_part("features", {"run": run_id}, name):
        return False
    feat = Featurizer(EndpointModel(loaded.model), load_bank(wh, run_id), cfg.sketch, cfg.featurize)
    write_features(wh, feat.featurize(*load_pairs(wh, shard_ids, loaded), shard_ids), run_id, name)
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
                    parent_run_id: str | None = None, progress: bool = False) -> dict:
    """Bank, per-shard features and the curvature statistics for every pool pair. Resumes at shard
    granularity: shards whose part exists are skipped, and a resumed run writes the same bytes."""
    run_id = run_id or new_run_id("featurize")
    with recorded_run(wh, "featurize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      **_model_fields(cfg, loaded)) as row:
        ids, shards = featurize_prepare(cfg, wh, loaded, run_id)
        it = shards
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(shards, desc="featurize", unit="shard")
        done = sum(featurize_shard(cfg, wh, loaded, run_id, n, sh) for n, sh in enumerate(it))
        featurize_curvature(cfg, wh, loaded, run_id, ids)
        bank_id = load_bank(wh, run_id).bank_id
        row.update(bank_id=bank_id, rows_in=len(ids), rows_out=len(ids), rows_quarantined=0,
                   input_fingerprints=json.dumps({"pool_pairs": len(ids)}))
    return {"run_id": run_id, "pairs": len(ids), "shards": len(shards), "shards_written": done, "bank_id": bank_id}


def score_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, featurize_run_id: str,
                run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """Target statistics from the eval set (the model runs over the eval set only), then every
    score for every featurized pool pair from the stored features, bank and curvature."""
    run_id = run_id or new_run_id("score")
    eval_ids = source_pair_ids(wh, cfg.target)
    if len(eval_ids) < 2:
        raise ValueError(f"target sources {[s.name for s in cfg.target]} hold {len(eval_ids)} pairs; need at least 2")
    with recorded_run(wh, "score", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"featurize_run_id": featurize_run_id, "eval_pairs": len(eval_ids)},
                      **_model_fields(cfg, loaded)) as row:
        bank = load_bank(wh, featurize_run_id)
        ctx = ScoringContext(EndpointModel(loaded.model), bank, cfg.sketch)
        tstats = target_stats(ctx, *load_pairs(wh, eval_ids, loaded), eval_ids, cfg.featurize)
        features = read_features(wh, featurize_run_id)
        curv = load_curvature(wh, featurize_run_id)
        scores = score_features(features, tstats, curv, cfg.curvature, cfg.score,
                                Preconditioners.solve(tstats, curv, cfg.curvature))
        wh.write("scores", scores_table(features.pair_id, scores, run_id), {"run": run_id}, "scores")
        row.update(bank_id=bank.bank_id, rows_in=len(features), rows_out=len(features), rows_quarantined=0)
    return {"run_id": run_id, "pairs": len(features), "eval_pairs": len(eval_ids), "eval_loss": tstats.eval_loss}


def materialize_stage(cfg: RunConfig, wh: Warehouse, score_run_id: str, run_id: str | None = None,
                      parent_run_id: str | None = None) -> dict:
    """Subsets at every (method, budget): the ``subsets`` table, and per subset a Parquet manifest
    and an open_clip_train CSV (``filepath``, ``title``) under ``cfg.outputs.dir``."""
    run_id = run_id or new_run_id("materialize")
    with recorded_run(wh, "materialize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"score_run_id": score_run_id}) as row:
        st = wh.read("scores", filter=pc.field("run_id") == score_run_id)
        ids = st.column("pair_id").to_pylist()
        scores = {m: st.column(m).to_numpy() for m in cfg.methods}
        subsets = subsets_table(ids, scores, cfg.budgets, cfg.methods, run_id, score_run_id)
        wh.write("subsets", subsets, {"run": run_id}, "subsets")
        files = write_manifests(wh, subsets, Path(cfg.outputs.dir) / run_id, cfg.outputs.formats)
        row.update(rows_in=len(ids), rows_out=subsets.num_rows, rows_quarantined=0)
    return {"run_id": run_id, "subsets": sorted(set(subsets.column("subset_id").to_pylist())), "files": files}


def write_manifests(wh: Warehouse, subsets: pa.Table, out: Path, formats) -> list[str]:
    """Export each selected image once (``images/<pair_id>.<ext>``) and write per-subset manifests."""
    import csv

    if not formats:  # the subsets table only (e.g. a trainer that reads pairs from the warehouse)
        return []
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(set(subsets.column("pair_id").to_pylist()))
    pairs = wh.read("pairs", columns=["pair_id", "caption", "image", "image_format"],
                    filter=pc.field("pair_id").isin(ids)).to_pylist()
    (out / "images").mkdir(exist_ok=True)
    where = {}
    for p in pairs:
        ext = {"JPEG": "jpg"}.get(p["image_format"], (p["image_format"] or "bin").lower())
        path = (out / "images" / f"{p['pair_id']}.{ext}").resolve()
        if not path.exists():
            path.write_bytes(p["image"])
        where[p["pair_id"]] = (str(path), p["caption"])
    files = []
    for sid in sorted(set(subsets.column("subset_id").to_pylist())):
        rows = subsets.filter(pc.field("subset_id") == sid).sort_by("rank").to_pylist()
        stem = sid.split(":", 1)[1].replace("@", "_at_")
        if "parquet" in formats:
            t = pa.table({"pair_id": [r["pair_id"] for r in rows], "rank": [r["rank"] for r in rows],
                          "filepath": [where[r["pair_id"]][0] for r in rows],
                          "title": [where[r["pair_id"]][1] for r in rows]})
            pq.write_table(t, out / f"{stem}.parquet")
            files.append(str(out / f"{stem}.parquet"))
        if "csv" in formats:
            with open(out / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["filepath", "title"])
                w.writerows(where[r["pair_id"]] for r in rows)
            files.append(str(out / f"{stem}.csv"))
    return files


# ---------------------------------------------------------------------------------------------
# Continual pre-training on a subset, and evaluation

def subset_data(wh: Warehouse, subset_id: str, loaded: LoadedModel):
    """The pairs of one materialised subset (``<score run>:<method>@<budget>``), images decoded on demand."""
    from .cpt import ImageFilePairs

    sub = wh.read("subsets", columns=["subset_id", "pair_id", "rank"], filter=pc.field("subset_id") == subset_id)
    if sub.num_rows == 0:
        known = sorted(set(wh.read("subsets", columns=["subset_id"]).column("subset_id").to_pylist()))
        raise KeyError(f"subset {subset_id!r} not in the subsets table (known: {known[:8]}{' ...' if len(known) > 8 else ''})")
    ids = sorted(set(sub.column("pair_id").to_pylist()))
    rows = {r["pair_id"]: r for r in wh.read("pairs", columns=["pair_id", "caption", "image"],
                                             filter=pc.field("pair_id").isin(ids)).to_pylist()}
    return ImageFilePairs([rows[i]["image"] for i in ids], [rows[i]["caption"] for i in ids],
                          image_preprocess(loaded.model), loaded.tokenizer, ids)


def manifest_data(path: str | Path, loaded: LoadedModel):
    """The pairs of a manifest (Parquet or open_clip CSV/TSV with ``filepath`` and ``title``)."""
    from .cpt import ImageFilePairs
    from .evaluate import read_pair_table

    t = read_pair_table(path, "manifest")
    for col in ("filepath", "title"):
        if col not in t.column_names:
            raise KeyError(f"manifest {str(path)!r} has no column {col!r} (has {t.column_names})")
    files, titles = t.column("filepath").to_pylist(), t.column("title").to_pylist()
    base = Path(path).parent
    files = [f if Path(f).is_absolute() else str(base / f) for f in files]
    return ImageFilePairs(files, titles, image_preprocess(loaded.model), loaded.tokenizer, files)


def cpt_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, data, out_dir: str | Path,
              subset_id: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
              progress: bool = False) -> dict:
    """Continual pre-training of ``loaded.model`` (in place) on ``data`` with ``cfg.cpt``; resumes from
    ``out_dir``'s checkpoints. Records a ``cpt`` run whose inputs name the subset."""
    from .cpt import train_cpt

    run_id = run_id or new_run_id("cpt")
    with recorded_run(wh, "cpt", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"subset_id": subset_id, "data": data.fingerprint(), "out_dir": str(out_dir)},
                      **_model_fields(cfg, loaded)) as row:
        out = train_cpt(loaded.model, data, cfg.cpt, out_dir, device=cfg.device, progress=progress)
        row.update(rows_in=len(data), rows_out=out["steps"], rows_quarantined=0)
    return {"run_id": run_id, **out}


def eval_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, suites, checkpoint: str | None = None,
               cpt_run_id: str | None = None, subset_id: str | None = None, run_id: str | None = None,
               parent_run_id: str | None = None) -> dict:
    """Every metric of every suite for one model, as ``evals`` rows joinable to the selection."""
    from .evaluate import evaluate_suite
    from .warehouse import SCHEMAS

    run_id = run_id or new_run_id("eval")
    rows = []
    with recorded_run(wh, "eval", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"checkpoint": checkpoint, "cpt_run_id": cpt_run_id, "subset_id": subset_id,
                              "suites": [s.name for s in suites]}, **_model_fields(cfg, loaded)) as row:
        for suite in suites:
            for metric, value in evaluate_suite(loaded.model, loaded.tokenizer, suite, cfg.device).items():
                rows.append({"run_id": run_id, "cpt_run_id": cpt_run_id, "subset_id": subset_id,
                             "model_checkpoint": checkpoint, "model_checksum": loaded.checksum, "suite": suite.name,
                             "metric": metric, "value": value, "n": len(suite.captions)})
        wh.write("evals", pa.Table.from_pylist(rows, schema=SCHEMAS["evals"]), {"run": run_id}, "evals")
        row.update(rows_in=sum(len(s.captions) for s in suites), rows_out=len(rows), rows_quarantined=0)
    return {"run_id": run_id, "metrics": rows}


def run_pipeline(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = False) -> dict:
    """Ingest (pool and target), featurize, score, materialize — the library's whole pipeline."""
    from .stages import run_ingest

    wh = Warehouse(cfg.warehouse, cfg.storage_options)
    loaded = loaded or load_model(cfg.model, cfg.device)
    parent = new_run_id("pipeline")
    with recorded_run(wh, "pipeline", cfg, run_id=parent, **_model_fields(cfg, loaded)):
        ingest = run_ingest(list(cfg.pool) + list(cfg.target), wh, parent_run_id=parent, progress=progress)
        feat = featurize_stage(cfg, wh, loaded, parent_run_id=parent, progress=progress)
        score = score_stage(cfg, wh, loaded, feat["run_id"], parent_run_id=parent)
        mat = materialize_stage(cfg, wh, score["run_id"], parent_run_id=parent)
    return {"run_id": parent, "ingest": ingest, "featurize": feat, "score": score, "materialize": mat}
