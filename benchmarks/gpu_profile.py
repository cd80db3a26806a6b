"""Where featurize's time goes beyond the forward pass, on one device, in one run (issue 31, item 1).

Per model and precision, from decoded tensors (random inputs, random weights: speed does not depend on them):

* ``forward``: the encoders alone under the featurizer's autocast (``encode_image`` + ``encode_text``);
* ``featurize``: ``Featurizer.featurize`` (k = 512, K = 1024, micro-batch = --batch);
* the phases of featurize, timed with a device sync between them: ``trunks`` (``encode_pre``: the encoders up to the
  end-point site, with the site removed), ``embed`` (the float32 end-point projection and normalisation,
  ``ScoringContext.embed``), ``bank`` (``sample_features``: the bank products, softmaxes and the sketch) and ``host``
  (the copy of the features to the host as float32 NumPy);
* with ``--compile``: the same forward and featurize with ``torch.compile`` of both encoders;
* one ``torch.profiler`` trace of a featurize micro-batch (bf16 when measured), its top operators by device time
  written as a table and the trace as gzipped Chrome JSON;
* JPEG decode: pairs/s of PIL decode + resize on ``--decode-workers`` processes against
  ``torchvision.io.decode_jpeg(device='cuda')`` + resize on the GPU (CUDA only).

Run: python benchmarks/gpu_profile.py --device cuda --out DIR            (on the GPU machine: ~5 min)
     .venv/bin/python benchmarks/gpu_profile.py --device cpu --quick --out /tmp/p   (here: a check that it runs)
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from featurize_throughput import make_batch, make_model, sync  # noqa: E402

from chips_core.scoring.endpoint import EndpointModel, state_dict_checksum  # noqa: E402
from chips_core.scoring.featurize import (FeaturizeConfig, Featurizer, ReferenceBank, pad_rows,  # noqa: E402
                                          padded_chunks, sample_features)
from chips_core.scoring.sketch import SketchConfig  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(model, precision: str, device: str, bank_size: int, k: int, batch: int) -> Featurizer:
    ep = EndpointModel(model, precision)
    bi, bt = make_batch(model, bank_size, 999, device)
    bank = ReferenceBank.from_pairs(ep, bi, bt, [f"b{i}" for i in range(bank_size)],
                                    model_checksum=state_dict_checksum(model), seed=0, micro_batch=batch)
    return Featurizer(ep, bank, SketchConfig(k=k), FeaturizeConfig(micro_batch=batch, precision=precision))


def timed(fn, device: str, rounds: int) -> float:
    """Median seconds of ``fn()`` over ``rounds`` (after one warm-up)."""
    fn()
    out = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def phases(feat: Featurizer, images, texts, ids, device: str, rounds: int) -> dict:
    """Seconds per phase of featurize over the batch, a device sync between phases (median over rounds)."""
    mb = feat.config.micro_batch
    acc = {"trunks": [], "embed": [], "bank": [], "host": []}
    for _ in range(rounds + 1):
        t = dict.fromkeys(acc, 0.0)
        for rows, n in padded_chunks(len(ids), mb):
            sync(device)
            t0 = time.perf_counter()
            hv, ht = feat.endpoint.encode_pre(pad_rows(images[rows], mb), pad_rows(texts[rows], mb))
            sync(device)
            t1 = time.perf_counter()
            emb = feat.ctx.embed(hv, ht, list(ids[rows]) + [None] * (hv.shape[0] - n))
            sync(device)
            t2 = time.perf_counter()
            f = sample_features(feat.ctx, emb)
            sync(device)
            t3 = time.perf_counter()
            for v in (emb.x, emb.y, *f.values()):
                v[:n].detach().to("cpu", torch.float32).numpy()
            t4 = time.perf_counter()
            for key, dt in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[key] += dt
        for key in acc:
            acc[key].append(t[key])
    return {key: statistics.median(v[1:]) for key, v in acc.items()}  # the first round warms up


def measure(name: str, precision: str, device: str, n: int, batch: int, rounds: int, bank: int, compile_: bool,
            want_profile: bool = False, out: Path | None = None):
    model = make_model(name, device)
    images, texts = make_batch(model, n, 1, device)
    ids = [f"p{i}" for i in range(n)]
    feat = build(model, precision, device, bank, 512, batch)

    def forward():
        with torch.no_grad(), feat.endpoint.autocast():
            for s in range(0, n, batch):
                model.encode_image(images[s:s + batch])
                model.encode_text(texts[s:s + batch])

    def featurize():
        for s in range(0, n, batch):
            feat.featurize(images[s:s + batch], texts[s:s + batch], ids[s:s + batch])

    row = {"model": name, "precision": precision, "pairs": n, "batch": batch, "compiled": False}
    row["forward_s"], row["featurize_s"] = timed(forward, device, rounds), timed(featurize, device, rounds)
    row["phases_s"] = phases(feat, images, texts, ids, device, rounds)
    rows = [row]
    table = profile((model, feat, images, texts, ids), device, out) if want_profile else ""  # before any compile
    if compile_:
        t0 = time.perf_counter()
        model.visual = torch.compile(model.visual)
        model.transformer = torch.compile(model.transformer)
        try:
            timed(forward, device, 1)
            timed(featurize, device, 1)
            comp = {"model": name, "precision": precision, "pairs": n, "batch": batch, "compiled": True,
                    "compile_s": time.perf_counter() - t0}
            comp["forward_s"], comp["featurize_s"] = timed(forward, device, rounds), timed(featurize, device, rounds)
            rows.append(comp)
        except Exception as e:  # noqa: BLE001 - report, do not lose the other measurements
            rows.append({"model": name, "precision": precision, "compiled": True, "error": f"{type(e).__name__}: {e}"[:300]})
    for r in rows:
        if "forward_s" in r:
            r["forward_pairs_s"], r["featurize_pairs_s"] = n / r["forward_s"], n / r["featurize_s"]
            r["ratio"] = r["forward_s"] / r["featurize_s"]
        log(json.dumps(r))
    return rows, table


def profile(objs, device: str, out: Path) -> str:
    """One featurize micro-batch under torch.profiler: the top operators by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    model, feat, images, texts, ids = objs
    mb = feat.config.micro_batch
    feat.featurize(images[:mb], texts[:mb], ids[:mb])  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with tprofile(activities=acts, record_shapes=True) as prof:
        feat.featurize(images[:mb], texts[:mb], ids[:mb])
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        g.write(f.read())
    trace.unlink()
    return table


def _decode_cpu(blobs_and_size):
    from PIL import Image

    blobs, size = blobs_and_size
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BICUBIC)
    return len(blobs)


def decode_bench(n: int, workers: int, device: str) -> dict:
    """JPEG decode + resize to 224: PIL on ``workers`` processes vs nvJPEG on the GPU (batched)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(64):  # 64 distinct 384x384 photos-like JPEGs (smooth noise), reused
        img = (np.cumsum(rng.normal(size=(384, 384, 3)), axis=0) * 4 % 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    data = [blobs[i % 64] for i in range(n)]
    chunks = [(data[i:i + 64], 224) for i in range(0, n, 64)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_decode_cpu, chunks))
    res = {"pairs": done, "cpu_workers": workers, "cpu_pairs_s": done / (time.perf_counter() - t0)}
    if device.startswith("cuda"):
        import torchvision
        from torchvision.io import decode_jpeg

        tens = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]

        def gpu():
            for s in range(0, n, 256):
                imgs = decode_jpeg(tens[s:s + 256], device=device)
                torch.nn.functional.interpolate(torch.stack(imgs).float(), size=(224, 224), mode="bicubic")

        gpu()
        sync(device)
        t0 = time.perf_counter()
        gpu()
        sync(device)
        res["gpu_pairs_s"] = n / (time.perf_counter() - t0)
        res["torchvision"] = torchvision.__version__
    log(json.dumps(res))
    return res


def report(rows, decode, table, args, env: str, wall: float) -> str:
    L = ["# Featurize on the GPU: where the time goes", "",
         f"Generated by `python benchmarks/gpu_profile.py {' '.join(sys.argv[1:])}` ({wall / 60:.1f} min); {env}.",
         "Random weights and inputs (speed does not depend on them); k = 512, K = 1024. Seconds are medians over "
         f"{args.rounds} rounds after a warm-up; `ratio` = featurize pairs/s / forward-only pairs/s.", "",
         "| model | precision | compiled | forward pairs/s | featurize pairs/s | ratio | trunks | embed | bank | host |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['model']} | {r['precision']} | yes | {r['error']} | | | | | | |")
            continue
        ph = r.get("phases_s")
        cells = [f"{100 * ph[k] / r['featurize_s']:.0f}%" for k in ("trunks", "embed", "bank", "host")] if ph else ["—"] * 4
        L.append(f"| {r['model']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | {r['forward_pairs_s']:,.0f} | "
                 f"{r['featurize_pairs_s']:,.0f} | {r['ratio']:.3f} | " + " | ".join(cells) + " |")
    L += ["", "Phases are shares of featurize's time, measured in a separate pass with a device sync between phases "
          "(so they add up to a little more than featurize alone).", ""]
    if decode:
        L += ["JPEG decode + resize to 224 (384×384 JPEGs): "
              f"PIL on {decode['cpu_workers']} processes {decode['cpu_pairs_s']:,.0f} pairs/s"
              + (f"; nvJPEG on the GPU (`torchvision.io.decode_jpeg(device='cuda')`, batches of 256) "
                 f"{decode['gpu_pairs_s']:,.0f} pairs/s" if "gpu_pairs_s" in decode else "") + ".", ""]
    if table:
        L += ["Top operators of one featurize micro-batch of the first bf16 model, not compiled (torch.profiler; the "
              "Chrome trace is `trace.json.gz`):", "", "```", table, "```", ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="the demo model, small sizes: a check that it runs")
    ap.add_argument("--models", default="ViT-B-16,ViT-B-32")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", default="ViT-B-16:bf16", help="model:precision pairs to also run compiled ('' none)")
    ap.add_argument("--decode-workers", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.models, args.pairs, args.batch, args.rounds, args.compile = "demo", 128, 32, 1, ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the features' fp32 maths stays fp32
    env = (f"Python {platform.python_version()}, torch {torch.__version__}, "
           + (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU x{os.cpu_count()}")
           + (f", SDPA flash {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
              f"{torch.backends.cuda.mem_efficient_sdp_enabled()}" if args.device.startswith("cuda") else ""))
    log(env)
    compile_set = {tuple(x.split(":")) for x in args.compile.split(",") if x}
    rows, table = [], ""
    for name in args.models.split(","):
        for prec in args.precisions.split(","):
            r, t = measure(name, prec, args.device, args.pairs, args.batch, args.rounds, 1024 if not args.quick else 64,
                           (name, prec) in compile_set, want_profile=not table and prec == "bf16", out=out)
            rows += r
            table = table or t
    decode = decode_bench(512 if args.quick else 8192, min(args.decode_workers, os.cpu_count() or 1), args.device)
    (out / "gpu_profile.json").write_text(json.dumps({"rows": rows, "decode": decode, "env": env}, indent=1))
    (out / "gpu_profile.md").write_text(report(rows, decode, table, args, env, time.perf_counter() - t0))
    log(f"report: {out / 'gpu_profile.md'}")


if __name__ == "__main__":
    main()
