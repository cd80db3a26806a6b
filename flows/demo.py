"""Data and model for ``chips demo``: synthetic pool and target folders, and the demo CLIP (cached)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    return Path(os.environ.get("CHIPS_CACHE", Path.home() / ".cache" / "chips"))


def demo_checkpoint(steps: int) -> Path:
    """The demo CLIP's weights: trained once (seconds) and cached by step count."""
    import torch

    from chips_core.demo import train_demo_clip

    path = cache_dir() / f"demo_clip_{steps}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"training the demo CLIP ({steps} steps; cached at {path})...", flush=True)
        model = train_demo_clip(steps=steps, seed=0)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return path


def write_folder(folder: Path, data, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.clip(data.images[i].numpy() * 0.3 + 0.3, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(data.captions[i])


def _subset(data, idx):
    from chips_core.demo import SyntheticPairs

    return SyntheticPairs(data.images[idx], [data.captions[i] for i in idx], [data.pair_ids[i] for i in idx],
                          data.domain[idx], data.noisy[idx])


def prepare_demo(workdir: Path, pool_size: int = 600, eval_size: int = 100, steps: int = 300) -> dict:
    """Write the demo's pool and target folders (once) and return its run configuration."""
    from chips_core.demo import DEMO_MODEL_CONFIG, make_pairs

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
    return {
        "warehouse": str(workdir / "warehouse"),
        "pool": [{"name": "scan-archive", "kind": "folder", "paths": [str(scans)]},
                 {"name": "web-photos", "kind": "folder", "paths": [str(photos)]}],
        "target": [{"name": "demo-target", "kind": "folder", "paths": [str(target)]}],
        "model": {"config": DEMO_MODEL_CONFIG, "checkpoint": str(demo_checkpoint(steps))},
        "sketch": {"k": 256}, "bank": {"size": min(256, pool_size)},
        "curvature": {"n_curv": min(2000, pool_size), "hard_negatives": 16},
        "budgets": [0.1, 0.3, 0.5], "shard_size": 200,
        "outputs": {"dir": str(workdir / "out")},
    }
