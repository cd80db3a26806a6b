"""``chips demo``: the synthetic pool and target folders and the demo CLIP (trained once, cached) for
the platform demo, and the scoring-core demo (``chips demo --core``: the library alone, in memory)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from chips_core.scoring.endpoint import EndpointModel, ModelSpec, load_model, state_dict_checksum
from chips_core.scoring.featurize import BankConfig, FeaturizeConfig, Featurizer, ReferenceBank
from chips_core.scoring.score import METHODS, Preconditioners, ScoreConfig, score_features, select_top
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig, curvature_sample, curvature_stats, target_stats
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, SyntheticPairs, make_pairs, train_demo_clip
from chips_core.util import atomic_write, torch_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("CHIPS_CACHE", Path.home() / ".cache" / "chips"))


def demo_checkpoint(steps: int, progress: bool = True) -> Path:
    """The demo CLIP's weights: trained once (seconds) and cached by step count."""
    path = cache_dir() / f"demo_clip_{steps}.pt"
    if not path.is_file():
        print(f"training the demo CLIP ({steps} steps; cached at {path})...", flush=True)
        atomic_write(path, torch_bytes(train_demo_clip(steps=steps, seed=0, progress=progress).state_dict()))
    return path


def write_suite(path: Path, n: int, seed: int) -> None:
    """An evaluation suite of ``n`` clean scans as Parquet (``image`` bytes, ``title``, ``label``: the shape)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from chips_core.train.synthetic import SHAPES

    data = make_pairs(n, seed=seed, scan_fraction=1.0, noise_fraction=0.0)
    rows = []
    for i in range(n):
        arr = (data.images[i].numpy().transpose(1, 2, 0) * 0.3 + 0.3).clip(0, 1) * 255
        buf = io.BytesIO()
        Image.fromarray(arr.astype("uint8")).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "title": data.captions[i],
                     "label": next(s for s in SHAPES if s in data.captions[i])})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_folder(folder: Path, data, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.clip(data.images[i].numpy() * 0.3 + 0.3, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(data.captions[i])


def _subset(data, idx):
    return SyntheticPairs(data.images[idx], [data.captions[i] for i in idx], [data.pair_ids[i] for i in idx],
                          data.domain[idx], data.noisy[idx])


def prepare_demo(workdir: Path, pool_size: int = 600, eval_size: int = 100, steps: int = 300) -> dict:
    """Write the demo's pool and target folders and its evaluation suite (once), and its run configuration to
    ``<workdir>/demo.yaml`` (usable by ``chips run``, ``rescore``, ``cpt`` and ``eval``); return the config."""
    import yaml

    workdir = Path(workdir).resolve()
    data = workdir / "data" / f"pool-{pool_size}"
    scans, photos = data / "scans", data / "photos"
    target = workdir / "data" / f"target-{eval_size}"
    if not data.is_dir():
        pool = make_pairs(pool_size, seed=1)
        # two sources, as a team would have them: an archive of scans and a web scrape of photos
        for folder, keep in ((scans, pool.domain == "scan"), (photos, pool.domain != "scan")):
            idx = np.flatnonzero(keep)
            write_folder(folder, _subset(pool, idx), len(idx))
        # a few broken rows, so the demo shows quarantine at work
        (photos / "broken-0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        (photos / "broken-0.txt").write_text("an image that does not decode")
        (photos / "blank-caption.png").write_bytes((photos / "00001.png").read_bytes())
        (photos / "blank-caption.txt").write_text("   ")
        (photos / "no-caption.png").write_bytes((photos / "00002.png").read_bytes())
    if not target.is_dir():
        write_folder(target, make_pairs(eval_size, seed=2, scan_fraction=1.0, noise_fraction=0.0), eval_size)
    suite = workdir / "data" / "scan-suite.parquet"  # held out of pool and target: what `chips eval` measures
    if not suite.is_file():
        write_suite(suite, 200, seed=3)
    cfg = {
        "warehouse": str(workdir / "warehouse"),
        "pool": [{"name": "scan-archive", "kind": "folder", "paths": [str(scans)]},
                 {"name": "web-photos", "kind": "folder", "paths": [str(photos)]}],
        "target": [{"name": "demo-target", "kind": "folder", "paths": [str(target)]}],
        "model": {"config": DEMO_MODEL_CONFIG, "checkpoint": str(demo_checkpoint(steps))},
        "sketch": {"k": 256}, "bank": {"size": min(256, pool_size)},
        "curvature": {"n_curv": min(2000, pool_size), "hard_negatives": 16},
        "budgets": [0.1, 0.3, 0.5], "shard_size": 200,
        "outputs": {"dir": str(workdir / "out")},
        "cpt": {"epochs": 5, "batch_size": 32, "warmup_steps": 5, "keep_checkpoints": False},
        "eval_suites": [{"name": "scans", "path": str(suite),
                         "templates": ["a scan of a {c} lesion", "an x-ray showing a {c} lesion"]}],
    }
    (workdir / "demo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def run_core_demo(pool_size: int = 2000, eval_size: int = 200, steps: int = 300, budget: float = 0.3,
                  out_dir: str | None = None, seed: int = 0) -> dict:
    """The scoring library alone (no warehouse, no Prefect), step by step on synthetic pairs, printing
    what each method picked (``chips demo --core``). The demo CLIP comes from the cache ``chips demo`` uses
    (trained there once); nothing is written elsewhere unless ``out_dir`` is given."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    if seed == 0:
        print(f"[1/5] the demo CLIP ({steps} steps on synthetic pairs; cached in {cache_dir()})")
        model = load_model(ModelSpec(config=DEMO_MODEL_CONFIG, checkpoint=str(demo_checkpoint(steps)))).model
    else:
        print(f"[1/5] training the demo CLIP ({steps} steps on synthetic pairs, seed {seed})...")
        model = train_demo_clip(steps=steps, seed=seed, progress=True)
    checksum = state_dict_checksum(model)
    if out_dir:
        atomic_write(Path(out_dir) / "demo_clip.pt", torch_bytes(model.state_dict()))
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    pool = make_pairs(pool_size, seed + 1)
    target = make_pairs(4 * eval_size, seed + 2, scan_fraction=1.0, noise_fraction=0.0)
    target_images, target_texts = target.images[:eval_size], tok(target.captions[:eval_size])
    pool_texts = tok(pool.captions)
    endpoint = EndpointModel(model)
    fcfg, sk, bcfg, ccfg = FeaturizeConfig(), SketchConfig(k=512), BankConfig(size=512), CurvatureConfig(n_curv=2000)
    print(f"[2/5] reference bank of {bcfg.size} pairs, sketch k={sk.k}")
    index = {p: i for i, p in enumerate(pool.pair_ids)}
    bank_ids = ReferenceBank.draw_ids(pool.pair_ids, bcfg)
    bidx = [index[p] for p in bank_ids]
    bank = ReferenceBank.from_pairs(endpoint, pool.images[bidx], pool_texts[bidx], bank_ids,
                                    model_checksum=checksum, seed=bcfg.seed, micro_batch=fcfg.micro_batch)
    feat = Featurizer(endpoint, bank, sk, fcfg)
    print(f"[3/5] featurizing {pool_size} pool pairs")
    features = feat.featurize(pool.images, pool_texts, pool.pair_ids)
    print("[4/5] target statistics and curvature")
    tstats = target_stats(feat.ctx, target_images, target_texts, target.pair_ids[:eval_size], fcfg)
    sample = curvature_sample(pool.pair_ids, ccfg)
    sidx = [index[p] for p in sample]
    curv = curvature_stats(feat.ctx, pool.images[sidx], pool_texts[sidx], sample, ccfg, fcfg)
    print("[5/5] scoring and selecting")
    scores = score_features(features, tstats, curv, ccfg, ScoreConfig(), Preconditioners.solve(tstats, curv, ccfg))
    clean_scan = (pool.domain == "scan") & ~pool.noisy
    rows = []
    for method in METHODS:
        keep = select_top(scores[method], features.pair_id, budget)
        rows.append((method, float(clean_scan[keep].mean()), float(pool.noisy[keep].mean())))
    print(f"\nPool: {pool_size} pairs, {clean_scan.mean():.0%} clean scans, {pool.noisy.mean():.0%} mismatched captions; "
          f"target eval set: {eval_size} scans; budget {budget:.0%}")
    print(f"{'method':<20}{'clean scans picked':>20}{'mismatched picked':>20}")
    for method, cs, nz in rows:
        print(f"{method:<20}{cs:>20.1%}{nz:>20.1%}")
    order = select_top(scores["chips"], features.pair_id, 5 / pool_size)
    print("\nTop pairs by CHIPS utility (align x learnability x relevance):")
    for i in order:
        print(f"  {features.pair_id[i][:12]}  {pool.captions[i]!r:46}  A={scores['chips_align'][i]:+.3g} "
              f"wL={scores['w_learn'][i]:.2f} wR={scores['w_relevance'][i]:.2f}")
    print(f"\nDone in {time.perf_counter() - t0:.1f}s.")
    return {"rows": rows, "scores": scores, "features": features, "pool": pool}
