"""Trunk precision (``featurize.precision``): how much bf16/fp16 autocast changes the scores, and what it buys.

Quality, on the same pairs, each precision against fp32:
  * the demo CLIP (trained briefly on the synthetic scan/photo pairs, as the tests do): 1,024 pool pairs and 48
    target pairs, k = 256, K = 256; the Spearman correlation of the ``chips``, ``dot`` and ``clipscore`` scores
    and the overlap of their top 10% and 30% (|top_fp32 ∩ top_p| / |top_fp32|);
  * ViT-B-32 and ViT-B-16 with random weights (no pretrained weights exist offline) on random inputs: the same
    numbers, a check of numerical sensitivity only (a random model's ranking means nothing else);
Speed, per model and precision: forward-only pairs/s (the encoders under the same autocast) and featurize
pairs/s (k = 512, K = 1024; 128 with --quick), interleaved rounds in one process, median; and featurize /
forward-only.

Run: .venv/bin/python benchmarks/featurize_precision.py --out docs/benchmarks/featurize_precision.md
     [--device cuda] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from featurize_throughput import make_batch, make_model, sync  # noqa: E402

from chips_core.scoring.endpoint import EndpointModel, state_dict_checksum  # noqa: E402
from chips_core.scoring.featurize import FeaturizeConfig, Featurizer, ReferenceBank  # noqa: E402
from chips_core.scoring.identity import seeded_sample  # noqa: E402
from chips_core.scoring.score import ScoreConfig, score_features  # noqa: E402
from chips_core.scoring.sketch import SketchConfig  # noqa: E402
from chips_core.scoring.target import CurvatureConfig, curvature_sample, curvature_stats, target_stats  # noqa: E402

METHODS = ("chips", "dot", "clipscore")


def featurizer(model, precision: str, bank_images, bank_texts, bank_ids, k: int, micro_batch: int) -> Featurizer:
    ep = EndpointModel(model, precision)
    bank = ReferenceBank.from_pairs(ep, bank_images, bank_texts, bank_ids, model_checksum=state_dict_checksum(model),
                                    seed=0, micro_batch=micro_batch)
    return Featurizer(ep, bank, SketchConfig(k=k), FeaturizeConfig(micro_batch=micro_batch, precision=precision))


def all_scores(feat: Featurizer, images, texts, ids, eval_images, eval_texts, eval_ids, n_curv: int) -> dict:
    ccfg = CurvatureConfig(n_curv=n_curv, hard_negatives=8)
    sample = curvature_sample(ids, ccfg)
    pos = {p: i for i, p in enumerate(ids)}
    idx = [pos[p] for p in sample]
    curv = curvature_stats(feat.ctx, images[idx], texts[idx], sample, ccfg)
    tgt = target_stats(feat.ctx, eval_images, eval_texts, eval_ids)
    return score_features(feat.featurize(images, texts, ids), tgt, curv, ccfg, ScoreConfig())


def agreement(ref: dict, got: dict) -> dict:
    from scipy.stats import spearmanr

    out = {}
    for m in METHODS:
        a, b = np.asarray(ref[m]), np.asarray(got[m])
        row = {"spearman": float(spearmanr(a, b).statistic)}
        for frac in (0.1, 0.3):
            n = max(1, int(round(frac * len(a))))
            ta, tb = set(np.argsort(-a, kind="stable")[:n]), set(np.argsort(-b, kind="stable")[:n])
            row[f"top{int(frac * 100)}_overlap"] = len(ta & tb) / n
        out[m] = row
    return out


def quality(name: str, device: str, precisions, quick: bool) -> dict:
    """Scores at each precision on the same pairs, each compared with fp32."""
    if name == "demo":
        import open_clip

        from chips_core.train.synthetic import make_pairs, train_demo_clip

        model = train_demo_clip(steps=80, seed=0, n_pairs=1500).to(device).eval()
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
        pool = make_pairs(256 if quick else 1024, seed=31)
        ev = make_pairs(48, seed=32, scan_fraction=1.0, noise_fraction=0.0)
        images, texts, ids = pool.images.to(device), tok(pool.captions).to(device), list(pool.pair_ids)
        ei, et, eids = ev.images.to(device), tok(ev.captions).to(device), list(ev.pair_ids)
        k, bank_size, n_curv, mb = 256, 256, 200, 64
    else:
        model = make_model(name, device)
        n = 128 if quick else 512
        images, texts = make_batch(model, n, 1, device)
        ids = [f"p{i}" for i in range(n)]
        ei, et = make_batch(model, 32, 2, device)
        eids = [f"e{i}" for i in range(32)]
        k, bank_size, n_curv, mb = 256, 128, 64, 64
    chosen = seeded_sample(ids, bank_size, 0)
    pos = {p: i for i, p in enumerate(ids)}
    bi = [pos[p] for p in chosen]
    scores = {p: all_scores(featurizer(model, p, images[bi], texts[bi], chosen, k, mb), images, texts, ids, ei, et, eids,
                            n_curv) for p in precisions}
    return {"model": name, "pairs": len(ids),
            "vs_fp32": {p: agreement(scores["fp32"], scores[p]) for p in precisions if p != "fp32"}}


def speed(name: str, device: str, precisions, n: int, batch: int, rounds: int, bank_size: int = 1024) -> list[dict]:
    model = make_model(name, device)
    images, texts = make_batch(model, n, 1, device)
    bi, bt = make_batch(model, bank_size, 999, device)
    ids = [f"p{i}" for i in range(n)]
    feats = {p: featurizer(model, p, bi, bt, [f"b{i}" for i in range(bank_size)], 512, batch) for p in precisions}

    def forward_only(p):
        with torch.no_grad(), feats[p].endpoint.autocast():
            for s in range(0, n, batch):
                model.encode_image(images[s:s + batch])
                model.encode_text(texts[s:s + batch])

    def featurize(p):
        for s in range(0, n, batch):
            feats[p].featurize(images[s:s + batch], texts[s:s + batch], ids[s:s + batch])

    jobs = [(f"{kind}:{p}", fn, p) for p in precisions for kind, fn in (("forward", forward_only), ("featurize", featurize))]
    for _, fn, p in jobs:  # warm-up
        fn(p)
    times = {key: [] for key, _, _ in jobs}
    for r in range(rounds):  # interleaved, the order reversed every other round
        for key, fn, p in (jobs if r % 2 == 0 else jobs[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fn(p)
            sync(device)
            times[key].append(time.perf_counter() - t0)
    out = []
    for p in precisions:
        fwd, fea = n / statistics.median(times[f"forward:{p}"]), n / statistics.median(times[f"featurize:{p}"])
        out.append({"model": name, "precision": p, "pairs": n, "batch": batch, "rounds": rounds,
                    "forward_pairs_s": fwd, "featurize_pairs_s": fea, "ratio": fea / fwd})
    return out


def report(res: dict, args, wall: float) -> str:
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    L = ["# Featurize precision: bf16/fp16 trunks against fp32", "",
         f"Generated by `python benchmarks/featurize_precision.py {' '.join(sys.argv[1:])}` on {dev}, "
         f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}; wall time {wall:.0f} s. "
         "The encoders run under `torch.autocast`; every end-point quantity (h, embeddings, bank logits, the "
         "sketched gradient) is float32 (`chips_core/scoring/endpoint.py`, `EndpointModel.autocast`).", "",
         "## Do the scores change? (each precision against fp32, the same pairs)", "",
         "| model | pairs | precision | method | Spearman | top-10% overlap | top-30% overlap |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in res["quality"]:
        for p, rows in q["vs_fp32"].items():
            for m, r in rows.items():
                L.append(f"| {q['model']} | {q['pairs']:,} | {p} | {m} | {r['spearman']:.4f} | "
                         f"{r['top10_overlap']:.3f} | {r['top30_overlap']:.3f} |")
    worst = {p: min(r["spearman"] for q in res["quality"] if q["model"] == "demo" for r in q["vs_fp32"].get(p, {}).values())
             for p in args.precisions if p != "fp32" and any(p in q["vs_fp32"] for q in res["quality"] if q["model"] == "demo")}
    L += [""] + [f"- {p}, demo CLIP (the trained model): lowest Spearman over chips/dot/clipscore **{v:.4f}** "
                 f"(the issue's bar for a default: ≥ 0.99: {'met' if v >= 0.99 else 'not met'})" for p, v in worst.items()]
    L += ["- ViT-B rows use random weights on random inputs: they show numerical sensitivity, not ranking quality.", "",
          "## Speed (pairs/s, median of interleaved rounds)", "",
          "| model | precision | batch | pairs x rounds | forward-only | featurize | featurize / forward |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in res["speed"]:
        L.append(f"| {s['model']} | {s['precision']} | {s['batch']} | {s['pairs']} x {s['rounds']} | "
                 f"{s['forward_pairs_s']:,.0f} | {s['featurize_pairs_s']:,.0f} | {s['ratio']:.3f} |")
    by = {(s["model"], s["precision"]): s for s in res["speed"]}
    L.append("")
    for (m, p), s in by.items():
        if p != "fp32" and (m, "fp32") in by:
            L.append(f"- {m}: featurize in {p} is **{s['featurize_pairs_s'] / by[(m, 'fp32')]['featurize_pairs_s']:.2f}x** "
                     "fp32's pairs/s")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer pairs and rounds (a check that it runs)")
    ap.add_argument("--models", default=None, help="speed: comma-separated (default: demo, and ViT-B-32,ViT-B-16 "
                                                   "on CUDA or ViT-B-32 on CPU)")
    ap.add_argument("--precisions", default=None, help="default: fp32,bf16 (and fp16 on CUDA)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.precisions = (args.precisions or ("fp32,bf16,fp16" if cuda else "fp32,bf16")).split(",")
    models = (args.models or ("demo,ViT-B-32,ViT-B-16" if cuda else "demo,ViT-B-32")).split(",")
    if not cuda:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    res = {"quality": [], "speed": []}
    for m in models:
        if m == "demo" or not args.quick:
            res["quality"].append(quality(m, args.device, args.precisions, args.quick))
            print(json.dumps(res["quality"][-1]), flush=True)
    for m in models:
        big = m != "demo"
        n, batch, rounds = ((64, 32, 1) if args.quick else (256, 64, 3)) if big and not cuda else \
            ((512, 256, 1) if args.quick else (4096, 256, 3)) if big else ((1024, 256, 1) if args.quick else (16384, 1024, 5))
        res["speed"] += speed(m, args.device, args.precisions, n, batch, rounds, 128 if args.quick else 1024)
        print(json.dumps(res["speed"][-len(args.precisions):]), flush=True)
    text = report(res, args, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
