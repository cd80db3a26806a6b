"""What partitioning the pursuit costs in its picks (issue 27: "where a selector is superlinear, partition it and say
what that costs in quality"), read from a v3 run's stored features without training anything: on each target's
seed-0 score run, chips_pursuit's 10% and 20% sets with SelectConfig.partition 16384 (the default; one partition
here) and smaller, as the share of the default's picks they keep and their picks' mean cos(a_i, t).

    python benchmarks/selection/partition_overlap.py --workdir /work/v3run   # the workdir of run.py --v3
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--workdir", type=Path, required=True)
ap.add_argument("--json", type=Path, default=None)
args = ap.parse_args()
work = args.workdir / "v3-full"
import pyarrow.compute as pc  # noqa: E402
from chips_core.platform.warehouse import Warehouse  # noqa: E402
from chips_core.platform.features import load_direction, read_features  # noqa: E402
from chips_core.scoring.select import SelectConfig, select_set, unit, unit_rows  # noqa: E402
out = {}
st = json.loads((work / "state.json").read_text())
for target in [t for t in ("sheets", "animal_sheets", "fashion") if f"score_run:{t}:0" in st]:
    wh = Warehouse(str(work / target / "wh"))
    srun = st[f"score_run:{target}:0"]
    s = wh.read("scores", columns=["pair_id", "chips_plus"], filter=pc.field("run_id") == srun)
    ids = np.asarray(s.column("pair_id").to_pylist(), dtype=object)
    tier = s.column("chips_plus").to_numpy()
    v, feat = load_direction(wh, srun)
    f = read_features(wh, feat)
    row = {p: i for i, p in enumerate(f.pair_id)}
    el = ids[tier >= 2]
    g = np.asarray(f.g, np.float32)[[row[p] for p in el]]
    t, A = unit(v), unit_rows(g)
    for b in (0.1, 0.2):
        m = int(np.ceil(b * len(ids)))
        ref = None
        for P in (16384, 4096, 2048, 1024, 512):
            picks = select_set("chips_pursuit", el.tolist(), g, v, m, SelectConfig(partition=P))
            idx = {p: i for i, p in enumerate(el)}
            cos = float(np.mean(A[[idx[p] for p in picks]] @ t))
            ref = ref or set(picks)
            out[f"{target} {b:.0%} P={P}"] = dict(eligible=len(el), m=m, parts=int(np.ceil(len(el) / P)),
                                                   overlap=len(ref & set(picks)) / m, mean_cos=round(cos, 4))
            print(target, f"{b:.0%}", P, out[f"{target} {b:.0%} P={P}"], flush=True)
if args.json:
    args.json.write_text(json.dumps(out, indent=1))
