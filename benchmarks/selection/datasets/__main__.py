"""Build every selection dataset (quick and full), print sizes / class counts / noise fractions
and write contact sheets to ``/tmp/selection_data_*.png``:

    python benchmarks/selection/datasets      # from the repository root
    python -m datasets                        # from benchmarks/selection
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

if not __package__:  # run as ``python benchmarks/selection/datasets``: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import PairSet, contact_sheet, load_fashion, load_general, load_medical  # noqa: E402
from datasets.common import _fractions  # noqa: E402


def _summary(name: str, ps: PairSet) -> str:
    lines = [f"  {name}: {len(ps)} items, images {ps.images.shape}"]
    s, c = np.unique(ps.source, return_counts=True)
    lines.append("    sources: " + ", ".join(f"{a}={b}" for a, b in zip(s, c)))
    lines.append("    kinds: " + ", ".join(f"{a}={b}" for a, b in _fractions(ps).items()))
    if ps.classnames:
        bc = np.bincount(ps.labels[ps.labels >= 0], minlength=len(ps.classnames))
        lines.append("    classes: " + ", ".join(f"{n}={k}" for n, k in zip(ps.classnames, bc)) +
                     f", unlabelled={int((ps.labels < 0).sum())}")
    return "\n".join(lines)


def main():
    res, seed = 32, 0
    for quick in (True, False):
        t0 = time.perf_counter()
        gen, suites, grec = load_general(res=res, seed=seed, quick=quick)
        t1 = time.perf_counter()
        fashion = load_fashion(gen, res=res, seed=seed)
        t2 = time.perf_counter()
        med = load_medical(gen, res=res, seed=seed)
        t3 = time.perf_counter()
        mode = "quick" if quick else "full"
        print(f"=== {mode}: general {t1 - t0:.1f}s, fashion {t2 - t1:.1f}s, medical {t3 - t2:.1f}s "
              f"(total {t3 - t0:.1f}s)")
        print(_summary("general train", gen))
        for s in suites:
            print(_summary(f"suite {s.name}", s.pairs))
        for tg in (fashion, med):
            print(f" target {tg.name}")
            print(_summary("pool", tg.pool))
            print(_summary("eval_set", tg.eval_set))
            print(_summary(f"test {tg.test.name}", tg.test.pairs))
            print("    recipe:", json.dumps({k: tg.recipe[k] for k in ("pool_counts", "pool_fractions")}))
        if quick:
            continue
        sets = {"general": gen, "fashion_pool": fashion.pool, "fashion_test": fashion.test.pairs,
                "medical_pool": med.pool, "medical_eval": med.eval_set, "medical_test": med.test.pairs}
        sets.update({s.name: s.pairs for s in suites})
        for name, ps in sets.items():
            path = f"/tmp/selection_data_{name}.png"
            idx = contact_sheet(ps, path)
            print(f"  wrote {path}; first captions (row-major):")
            for j, i in enumerate(idx[:8]):
                print(f"    [{j}] {ps.kind[i]:>14} {ps.keys[i]}: {ps.captions[i]}")
        print(" medical split:", json.dumps(med.recipe["slices_per_source_and_role"]))


if __name__ == "__main__":
    main()
