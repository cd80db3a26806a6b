"""Synthetic image–caption pairs and the tiny demo CLIP the project trains itself (seconds on 2 CPUs),
for the demo, the tests and the benchmarks: no network, no downloaded weights.

Synthetic "catalogue" data: coloured shapes on a noisy background with captions. The target
domain is *scans* — grey-scale renderings captioned "a scan of a ... lesion" — and the pool mixes
scans with colour photos and with pairs whose caption belongs to another image (noise).
A good selector should pick clean scans first (``chips demo`` shows what each method picked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..scoring.endpoint import build_custom_model
from ..scoring.identity import content_pair_id

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
                    scan_fraction: float = 0.15, log_every: int = 0, progress: bool = False) -> torch.nn.Module:
    """Train the tiny demo CLIP from scratch on clean general data (few scans): seconds on a CPU
    (a progress bar with ``progress``)."""
    from ..util import progress as progress_bar

    import open_clip

    torch.manual_seed(seed)
    model = build_custom_model(DEMO_MODEL_CONFIG)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=DEMO_MODEL_CONFIG["text_cfg"]["context_length"])
    data = make_pairs(n_pairs, seed + 1000, scan_fraction=scan_fraction, noise_fraction=0.0)
    texts = tok(data.captions)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in progress_bar(range(steps), enabled=progress, desc="demo CLIP", unit="step"):
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
