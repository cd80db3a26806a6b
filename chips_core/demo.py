"""A self-contained scoring demo on a CLIP the project trains itself, in seconds, on 2 CPUs.

Synthetic "catalogue" data: coloured shapes on a noisy background with captions. The target
domain is *scans* — grey-scale renderings captioned "a scan of a ... lesion" — and the pool mixes
scans with colour photos and with pairs whose caption belongs to another image (noise).
A good selector should pick clean scans first; the demo prints what each method picked.

Run: ``python -m chips_core.demo`` (see README).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import BankConfig, CurvatureConfig, FeaturizeConfig, ScoreConfig, SketchConfig
from .featurize import Featurizer, ReferenceBank
from .identity import content_pair_id
from .models import EndpointModel, build_custom_model, state_dict_checksum
from .score import METHODS, Preconditioners, score_features, select_top
from .target import curvature_sample, curvature_stats, target_stats

DEMO_MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLORS = {"red": (1, .1, .1), "green": (.1, .9, .2), "blue": (.2, .3, 1), "yellow": (1, .9, .1),
          "white": (1, 1, 1), "purple": (.6, .1, .8)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
PHOTO_TEMPLATES = ("a photo of a {size} {color} {shape}", "a {color} {shape}", "clip art of a {size} {color} {shape}")
SCAN_TEMPLATES = ("a scan of a {size} {shape} lesion", "an x-ray showing a {size} {shape} lesion",
                  "medical scan, {size} {shape} shaped lesion")


@dataclass
class SyntheticPairs:
    images: torch.Tensor  # (N, 3, 32, 32), normalised
    captions: list[str]
    pair_ids: list[str]
    domain: np.ndarray  # "scan" or "photo"
    noisy: np.ndarray  # True where the caption describes another image


def _render(shape: str, rgb, size: str, rng: np.random.Generator, res: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    r = (9 if size == "large" else 5) + rng.uniform(-1, 1)
    cx, cy = rng.uniform(r + 1, res - r - 1, 2)
    dx, dy = xx - cx, yy - cy
    inside = {"circle": dx**2 + dy**2 <= r**2,
              "square": (abs(dx) <= r * .85) & (abs(dy) <= r * .85),
              "triangle": (dy <= r * .8) & (dy >= -r) & (abs(dx) <= (dy + r) * .6),
              "cross": ((abs(dx) <= r * .3) | (abs(dy) <= r * .3)) & (abs(dx) <= r) & (abs(dy) <= r)}[shape]
    img = rng.normal(0.15, 0.05, (3, res, res)).astype(np.float32)
    img[:, inside] = np.asarray(rgb, np.float32)[:, None] * rng.uniform(.8, 1.0)
    return np.clip(img, 0, 1)


def make_pairs(n: int, seed: int, scan_fraction: float = 0.3, noise_fraction: float = 0.15) -> SyntheticPairs:
    """``n`` pairs: a ``scan_fraction`` of grey scans, colour photos otherwise; a ``noise_fraction``
    of captions swapped to another pair's."""
    rng = np.random.default_rng(seed)
    imgs, caps, domain = [], [], []
    for _ in range(n):
        shape, size = SHAPES[rng.integers(len(SHAPES))], SIZES[rng.integers(len(SIZES))]
        if rng.random() < scan_fraction:
            g = rng.uniform(.7, 1.0)
            imgs.append(_render(shape, (g, g, g), size, rng).mean(0, keepdims=True).repeat(3, 0))
            caps.append(SCAN_TEMPLATES[rng.integers(3)].format(size=size, shape=shape))
            domain.append("scan")
        else:
            color = list(COLORS)[rng.integers(len(COLORS))]
            imgs.append(_render(shape, COLORS[color], size, rng))
            caps.append(PHOTO_TEMPLATES[rng.integers(3)].format(size=size, color=color, shape=shape))
            domain.append("photo")
    noisy = rng.random(n) < noise_fraction
    perm = rng.permutation(np.flatnonzero(noisy))
    caps = np.array(caps, dtype=object)
    caps[np.flatnonzero(noisy)] = caps[perm]
    arr = np.stack(imgs)
    ids = [content_pair_id(a.tobytes(), c) for a, c in zip(arr, caps)]
    images = (torch.from_numpy(arr) - 0.3) / 0.3
    return SyntheticPairs(images, list(caps), ids, np.array(domain), noisy)


def train_demo_clip(steps: int = 300, seed: int = 0, batch: int = 64, n_pairs: int = 4000,
                    scan_fraction: float = 0.15, log_every: int = 0) -> torch.nn.Module:
    """Train the tiny demo CLIP from scratch on clean general data (few scans): seconds on a CPU."""
    import open_clip

    torch.manual_seed(seed)
    model = build_custom_model(DEMO_MODEL_CONFIG)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=DEMO_MODEL_CONFIG["text_cfg"]["context_length"])
    data = make_pairs(n_pairs, seed + 1000, scan_fraction=scan_fraction, noise_fraction=0.0)
    texts = tok(data.captions)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n_pairs, (batch,), generator=gen)
        xi, yt, scale = model(data.images[idx], texts[idx])[:3]
        logits = scale * xi @ yt.t()
        tgt = torch.arange(batch)
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, tgt) + torch.nn.functional.cross_entropy(logits.t(), tgt))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"  train step {step:4d}  loss {loss.item():.3f}")
    return model.eval()


def run_demo(pool_size: int = 2000, eval_size: int = 200, steps: int = 300, budget: float = 0.3,
             out_dir: str | None = None, seed: int = 0) -> dict:
    import open_clip

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    print(f"[1/5] training the demo CLIP ({steps} steps on synthetic pairs)...")
    model = train_demo_clip(steps=steps, seed=seed)
    checksum = state_dict_checksum(model)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(out_dir) / "demo_clip.pt")
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m chips_core.demo", description=__doc__.split("\n")[0])
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--out-dir", default="artifacts/demo")
    a = p.parse_args(argv)
    run_demo(a.pool_size, a.eval_size, a.steps, a.budget, a.out_dir)


if __name__ == "__main__":
    main()
