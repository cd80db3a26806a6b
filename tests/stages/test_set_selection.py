"""The set-aware selectors through the platform: materialize reads the score run's eligible pairs' gradients and
direction, selects each budget's set on its own (not a prefix of the larger budget's), fills from chips_plus's
order, and gives the same bits for any shard layout, score thread count and BLAS thread count, equal to the
in-memory selection."""
from __future__ import annotations

import dataclasses

import numpy as np
import open_clip
import pyarrow.compute as pc
import pytest
from threadpoolctl import threadpool_limits

from chips_core.platform import query
from chips_core.platform.features import read_features
from chips_core.platform.readers import SourceSpec
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import LoadedModel, ModelSpec, state_dict_checksum
from chips_core.scoring.featurize import BankConfig
from chips_core.scoring.score import select_top
from chips_core.scoring.select import SET_METHODS, SelectConfig, select_set
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig
from chips_core.stages import featurize_stage, ingest_stage, materialize_stage, score_stage
from chips_core.stages.runconfig import OutputConfig, RunConfig
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs
from flows.demo import write_folder

BUDGETS = (0.1, 0.3)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("setsel")
    n = 300
    write_folder(tmp / "pool", make_pairs(n, seed=21), n)
    write_folder(tmp / "target", make_pairs(24, seed=22, scan_fraction=1.0, noise_fraction=0.0), 24)
    cfg = RunConfig(warehouse=str(tmp / "wh"), pool=(SourceSpec("pool", "folder", (str(tmp / "pool"),)),),
                    target=(SourceSpec("target", "folder", (str(tmp / "target"),)),),
                    model=ModelSpec(config=DEMO_MODEL_CONFIG), sketch=SketchConfig(k=32), bank=BankConfig(size=24),
                    curvature=CurvatureConfig(n_curv=60, hard_negatives=4), outputs=OutputConfig(dir=str(tmp / "out")),
                    budgets=BUDGETS, methods=("chips_plus", *SET_METHODS),
                    select=SelectConfig(partition=40, clusters=4, neighbours=4, pursuit_round=8),
                    # a loose agreement gate, so that the eligible tier is larger than the budgets
                    score=dataclasses.replace(RunConfig.__dataclass_fields__["score"].default, plus_match_quantile=0.0))
    wh = Warehouse(cfg.warehouse)
    ingest_stage(list(cfg.pool) + list(cfg.target), wh)
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    runs = {}
    for shard_size, threads in ((64, 1), (1000, 2)):
        c = dataclasses.replace(cfg, shard_size=shard_size, score_threads=threads)
        f = featurize_stage(c, wh, loaded, run_id=f"f{shard_size}")
        s = score_stage(c, wh, loaded, f["run_id"], run_id=f"s{shard_size}")
        runs[shard_size] = (f["run_id"], s["run_id"])
    return cfg, wh, runs, n


def _subsets(wh, run_id):
    t = wh.read("subsets", filter=pc.field("run_id") == run_id)
    out = {}
    for r in t.to_pylist():
        out.setdefault((r["method"], r["budget"]), []).append((r["rank"], r["pair_id"]))
    return {k: [p for _, p in sorted(v)] for k, v in out.items()}


def test_set_subsets_equal_the_in_memory_selection_for_any_layout(scored):
    cfg, wh, runs, n = scored
    got = {}
    for (shard_size, (feat, score)), blas in zip(runs.items(), (1, 2)):
        with threadpool_limits(blas):
            m = materialize_stage(cfg, wh, score, run_id=f"m{shard_size}")
        subs = _subsets(wh, m["run_id"])
        got[shard_size] = subs
        assert len([s for s in m["subsets"] if "full@" not in s]) == len(BUDGETS) * (1 + len(SET_METHODS))
    import glob
    import os

    from chips_core.platform.query import spill_dir
    assert glob.glob(os.path.join(spill_dir(), "chips-select-*")) == []  # the partitions' spool is removed
    a, b = got.values()
    assert a == b  # the same pairs in the same order: shard layout, score threads and BLAS threads do not matter

    # the in-memory reference: the eligible tier's gradients, select_set, then chips_plus's order of the rest
    feat, score = runs[64]
    f = read_features(wh, feat)
    sc = wh.read("scores", filter=pc.field("run_id") == score)
    plus = dict(zip(sc.column("pair_id").to_pylist(), sc.column("chips_plus").to_numpy()))
    elig = [i for i, p in enumerate(f.pair_id) if plus[p] >= 2]
    assert len(elig) > 0.3 * n  # the sets are chosen inside the tier, not filled
    from chips_core.platform.features import load_direction
    v, feat_run = load_direction(wh, score)
    assert feat_run == feat
    ids = list(plus)
    fill_order = [ids[i] for i in select_top(np.array([plus[p] for p in ids]), ids, 1.0)]
    for method in SET_METHODS:
        for budget in BUDGETS:
            k = int(np.ceil(budget * n - 1e-9))
            want = select_set(method, [f.pair_id[i] for i in elig], f.g[elig], v, k, cfg.select)
            want += [p for p in fill_order if p not in set(want)][:k - len(want)]
            assert a[(method, budget)] == want, (method, budget)
    # a set's budget is its own: the larger set need not extend the smaller one (the infomax and cluster shares per
    # partition change with the budget), and the audits still hold
    con = query.connect(wh)
    assert all(t.num_rows == 0 for t in query.run_audits(con).values())


def test_score_run_without_direction_is_named(scored, tmp_path):
    cfg, wh, runs, n = scored
    _, score = runs[64]
    wh.fs.rm(wh.path("globals", f"run={score}", "direction.npz"))
    with pytest.raises(FileNotFoundError, match="score again"):
        materialize_stage(cfg, wh, score, run_id="m-nodir")
