"""Featurize end to end from WebDataset shards of JPEGs, beside featurize from decoded tensors and forward-only.

For each model and precision, on one machine, in one process:
  * ``shards``: ``featurize_stage`` over a pool ingested with ``images: reference`` (the warehouse keeps where
    each JPEG lives in its tar shard): reading the members, decoding and preprocessing them (in ``num_workers``
    DataLoader workers, or in the stage's own process with 0), the forward, the CHIPS maths, writing the feature
    parts, the bank (K pairs, forwarded once per run) and the curvature reduce; pairs/s = pool pairs / wall time;
  * ``decoded``: ``Featurizer.featurize`` over the same pairs already decoded and preprocessed, on the device;
  * ``forward``: ``encode_image`` + ``encode_text`` alone over the same tensors (what any embedding job pays);
  * the share of one shard's time in read + decode, host-to-device copy, forward, the CHIPS maths and writing
    its parts, each timed alone on the same pairs.

Run:  .venv/bin/python benchmarks/featurize_shards.py [--device cpu|cuda] [--models demo,ViT-B-32]
      [--precisions fp32] [--workers 0,2] [--out docs/benchmarks/featurize_shards.md]
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chips_core.platform.warehouse import Warehouse  # noqa: E402
from chips_core.scoring.endpoint import load_model  # noqa: E402
from chips_core.scoring.featurize import Featurizer, forward_pre_batches  # noqa: E402
from chips_core.stages import featurize_stage, ingest_stage  # noqa: E402
from chips_core.stages.common import endpoint_for, model_inputs  # noqa: E402
from chips_core.stages.featurize import featurize_prepare  # noqa: E402
from chips_core.stages.runconfig import load_run_config  # noqa: E402
from chips_core.platform.features import load_bank, save_pre, write_features  # noqa: E402
from chips_core.train.synthetic import DEMO_MODEL_CONFIG  # noqa: E402

WORDS = ("red blue green small large round square striped dotted dog cat car tree house boat bird chair shoe "
         "lamp cup plate street beach forest mountain city night morning photo drawing close-up view").split()


def write_shards(folder: Path, n: int, per_shard: int, size: int, seed: int = 0) -> list[str]:
    """``n`` pairs of ``size``-pixel JPEGs (smooth colour fields with noise: about the bytes of a web photo of
    that size) and captions of 6-12 words, in WebDataset tar shards of ``per_shard`` pairs."""
    rng, words = np.random.default_rng(seed), random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for s in range(0, n, per_shard):
        path = folder / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                a, b, c = rng.uniform(0, 1, 3)
                base = np.stack([a * xx + (1 - a) * yy, b * yy + c * xx, (xx * yy + c) % 1.0], -1)
                pixels = np.clip(base * 255 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                caption = " ".join(words.choice(WORDS) for _ in range(words.randint(6, 12))).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def config(workdir: Path, model: str, shards: list[str], target: list[str], args, precision: str, workers: int):
    spec = {"config": DEMO_MODEL_CONFIG} if model == "demo" else {"name": model}
    return load_run_config({
        "warehouse": str(workdir / "warehouse"), "device": args.device, "model": spec,
        "pool": [{"name": "pool", "kind": "webdataset", "paths": shards, "images": "reference"}],
        "target": [{"name": "target", "kind": "webdataset", "paths": target, "images": "reference"}],
        "sketch": {"k": args.k}, "bank": {"size": args.bank}, "curvature": {"n_curv": args.bank, "hard_negatives": 16},
        "featurize": {"micro_batch": args.batch, "precision": precision, "num_workers": workers},
        "shard_size": args.shard_size, "budgets": [0.1]})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def measure(workdir: Path, model: str, precision: str, args, shards, target) -> list[dict]:
    rows = []
    cfg0 = config(workdir, model, shards, target, args, precision, 0)
    loaded = load_model(cfg0.model, cfg0.device)
    wh = Warehouse(cfg0.warehouse)
    threads = torch.get_num_threads()
    for w, t in args.workers:  # end to end from the shards, a fresh run each
        cfg = config(workdir, model, shards, target, args, precision, w)
        run_id = f"{model}-{precision}-w{w}-{time.time_ns()}"
        torch.set_num_threads(t or threads)
        dt, out = timed(lambda: featurize_stage(cfg, wh, loaded, run_id=run_id), args.device)
        rows.append({"model": model, "precision": precision, "mode": "shards", "workers": w,
                     "threads": torch.get_num_threads(), "pairs": out["pairs"], "seconds": dt, "pairs_s": out["pairs"] / dt})
        print(json.dumps(rows[-1]), flush=True)
    torch.set_num_threads(threads)
    # the same pairs decoded once, on the device; then featurize and forward-only over them
    plan = featurize_prepare(cfg0, wh, loaded, run_id)
    feat = Featurizer(endpoint_for(cfg0, loaded), load_bank(wh, run_id), cfg0.sketch, cfg0.featurize)
    shard = plan.shards[0]
    t_read, table = timed(lambda: plan.scan.read(shard), "cpu")
    t_decode, (images, texts) = timed(lambda: model_inputs(table, loaded), "cpu")
    ids = table.column("pair_id").to_pylist()
    pinned = images.pin_memory() if args.device.startswith("cuda") else images
    t_copy, (images_d, texts_d) = timed(lambda: (pinned.to(args.device, non_blocking=True),
                                                 texts.to(args.device, non_blocking=True)), args.device)
    mb = cfg0.featurize.micro_batch
    chunks = [(images_d[s:s + mb], texts_d[s:s + mb]) for s in range(0, len(ids), mb)]
    t_forward, (h_v, h_t) = timed(lambda: forward_pre_batches(feat.endpoint, chunks, mb), args.device)
    t_maths, features = timed(lambda: feat.featurize_pre(h_v, h_t, ids), args.device)
    scratch = f"write-{time.time_ns()}"
    t_write, _ = timed(lambda: (save_pre(wh, scratch, "shard-00000", ids[:args.bank], h_v[:args.bank], h_t[:args.bank]),
                                write_features(wh, features, scratch, "shard-00000")), "cpu")
    t_feat, _ = timed(lambda: feat.featurize(images_d, texts_d, ids), args.device)
    endpoint = feat.endpoint

    def forward_only():
        with torch.no_grad(), endpoint.autocast():
            for im, tx in chunks:
                loaded.model.encode_image(im)
                loaded.model.encode_text(tx)
    t_fwd_only, _ = timed(forward_only, args.device)
    compiled = []
    if args.compile:  # torch.compile of the two encoders: first call (compilation), then a timed pass
        enc_i, enc_t = torch.compile(loaded.model.encode_image), torch.compile(loaded.model.encode_text)

        def forward_compiled():
            with torch.no_grad(), endpoint.autocast():
                for im, tx in chunks:
                    enc_i(im)
                    enc_t(tx)
        t_compile, _ = timed(forward_compiled, args.device)
        t_comp, _ = timed(forward_compiled, args.device)
        compiled = [{"model": model, "precision": precision, "mode": "forward, torch.compile", "workers": None,
                     "pairs": len(ids), "seconds": t_comp, "pairs_s": len(ids) / t_comp, "compile_s": t_compile - t_comp}]
    m = len(ids)
    total = t_read + t_decode + t_copy + t_forward + t_maths + t_write
    rows.append({"model": model, "precision": precision, "mode": "decoded", "workers": None, "pairs": m,
                 "seconds": t_feat, "pairs_s": m / t_feat})
    rows.append({"model": model, "precision": precision, "mode": "forward", "workers": None, "pairs": m,
                 "seconds": t_fwd_only, "pairs_s": m / t_fwd_only})
    rows.append({"model": model, "precision": precision, "mode": "shares", "workers": 0, "pairs": m,
                 "seconds": total, "pairs_s": m / total,
                 "shares": {"read + decode": (t_read + t_decode) / total, "copy": t_copy / total,
                            "forward": t_forward / total, "chips maths": t_maths / total, "write": t_write / total}})
    rows += compiled
    for r in rows[-3 - len(compiled):]:
        print(json.dumps(r), flush=True)
    return rows


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, {torch.get_num_threads()} CPU threads"
    import os
    return f"{len(os.sched_getaffinity(0))} CPUs ({platform.machine()})"


def report(rows: list[dict], args, wall: float) -> str:
    threads = torch.get_num_threads()
    lines = ["# Featurize end to end from JPEG shards", "",
             f"Generated by `python benchmarks/featurize_shards.py {' '.join(sys.argv[1:])}` on {machine(args.device)}, "
             f"torch {torch.__version__}, Python {platform.python_version()}; wall time {wall / 60:.1f} min; alone on "
             "the machine. One process; each row one pass (no repeats: read the ratios, not the last digit).", "",
             f"Pool: {args.pairs} pairs of {args.image_size}x{args.image_size} JPEGs (quality 90) with 6-12-word "
             f"captions, in WebDataset tars of {args.per_tar} pairs, ingested with `images: reference`; k = {args.k}, "
             f"K = {args.bank} (bank and curvature sample), micro-batch {args.batch}, shard size {args.shard_size}.", "",
             "- `shards`: `featurize_stage` end to end (read the JPEG members from the tars, decode and preprocess "
             "them in `num_workers` DataLoader workers or, with 0, in the stage's process; forward; CHIPS maths; "
             "write the parts; the bank and curvature reduce): pool pairs / wall seconds.",
             "- `decoded`: `Featurizer.featurize` over one shard's pairs already decoded, on the device.",
             "- `forward`: `encode_image` + `encode_text` alone over the same tensors, same precision; with "
             "`--compile`, also through `torch.compile` (its compilation time in the summary).",
             "- shares: one shard's time split into read + decode (in one process), host-to-device copy, "
             "forward, CHIPS maths and writing its feature part (and K trunk-output rows), each timed alone.", "",
             "| model | precision | mode | workers | torch threads | pairs | seconds | pairs/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["mode"] == "shares":
            continue
        lines.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {'' if r['workers'] is None else r['workers']} "
                     f"| {r.get('threads') or threads} | {r['pairs']:,} | {r['seconds']:.1f} | {r['pairs_s']:,.1f} |")
    lines += ["", "| model | precision | read + decode | copy | forward | CHIPS maths | write |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["mode"] == "shares":
            s = r["shares"]
            lines.append(f"| {r['model']} | {r['precision']} | " + " | ".join(f"{100 * s[k]:.0f}%" for k in
                                                                            ("read + decode", "copy", "forward", "chips maths", "write")) + " |")
    lines += [""]
    for (model, precision) in dict.fromkeys((r["model"], r["precision"]) for r in rows):
        by = {(r["mode"], r["workers"]): r for r in rows if r["model"] == model and r["precision"] == precision
              and r["mode"] != "shards"}
        sh = {(r["workers"], r["threads"]): r["pairs_s"] for r in rows
              if r["model"] == model and r["precision"] == precision and r["mode"] == "shards"}
        dec, fwd = by[("decoded", None)]["pairs_s"], by[("forward", None)]["pairs_s"]
        best = max(sh, key=sh.get)
        parts = [f"end to end {sh[best]:,.1f} pairs/s with {best[0]} workers and {best[1]} torch threads"]
        if (0, threads) in sh and best != (0, threads):
            parts.append(f"{sh[best] / sh[(0, threads)]:.2f}x decoding in the stage's process (0 workers, {threads} threads)")
        parts.append(f"{sh[best] / dec:.2f} of featurize from decoded tensors")
        parts.append(f"featurize / forward-only from decoded tensors {dec / fwd:.3f}")
        comp = next((r for r in rows if r["model"] == model and r["precision"] == precision
                     and r["mode"] == "forward, torch.compile"), None)
        if comp:
            parts.append(f"torch.compile: forward-only {comp['pairs_s'] / fwd:.2f}x eager after "
                         f"{comp['compile_s']:.0f} s of compilation")
        lines.append(f"- {model} {precision}: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="demo,ViT-B-32")
    p.add_argument("--precisions", default="fp32")
    p.add_argument("--workers", default="0,2,2t1",
                   help="end-to-end runs: decode workers, optionally with the model's torch threads (2t1: 2 workers, "
                        "1 thread; default: torch's)")
    p.add_argument("--pairs", default="demo=4096,ViT-B-32=256",
                   help="pool pairs per model (model=N,...; one number for every model)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--per-tar", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bank", type=int, default=256)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="also forward-only with torch.compile'd encoders")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.workers = [(int(w.split("t")[0]), int(w.split("t")[1]) if "t" in w else None) for w in args.workers.split(",")]
    pairs = dict(x.split("=") for x in args.pairs.split(",")) if "=" in args.pairs else None
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        for model in args.models.split(","):
            n = int(pairs[model]) if pairs else int(args.pairs)
            work = base / f"{model}-{n}"
            shards = write_shards(work / "pool", n, args.per_tar, args.image_size)
            target = write_shards(work / "target", 64, 64, args.image_size, seed=1)
            cfg = config(work, model, shards, target, args, "fp32", 0)
            ingest_stage(list(cfg.pool) + list(cfg.target), Warehouse(cfg.warehouse))
            for precision in args.precisions.split(","):
                rows += measure(work, model, precision, args, shards, target)
    args.pairs = args.pairs if not pairs else ", ".join(f"{m}: {v}" for m, v in pairs.items())
    text = report(rows, args, time.time() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
