"""Featurize makes one pass over the pool: shards are row groups of the ``pairs`` parts in storage order, so the
image bytes read (counted by the warehouse) do not grow with the number of shards, and the features, bank and
curvature are the same whatever the sharding, and equal to featurizing the pool in memory."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

import numpy as np
import open_clip
import pytest

from chips_core.platform.features import load_bank, load_curvature, read_features
from chips_core.platform.readers import SourceSpec
from chips_core.platform.warehouse import PAIRS_ROW_GROUP, Warehouse
from chips_core.scoring.endpoint import EndpointModel, LoadedModel, ModelSpec, state_dict_checksum
from chips_core.scoring.featurize import BankConfig, Featurizer
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig
from chips_core.stages import featurize_stage, ingest_stage
from chips_core.stages.common import load_pairs, source_pair_ids
from chips_core.stages.runconfig import OutputConfig, RunConfig
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs
from flows.demo import write_folder


@pytest.fixture(scope="module")
def pool(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("onepass")
    n = 2 * PAIRS_ROW_GROUP + 44  # three row groups in the pool's part
    write_folder(tmp / "pool", make_pairs(n, seed=11), n)
    write_folder(tmp / "target", make_pairs(20, seed=12, scan_fraction=1.0, noise_fraction=0.0), 20)
    cfg = RunConfig(warehouse=str(tmp / "wh"), pool=(SourceSpec("pool", "folder", (str(tmp / "pool"),)),),
                    target=(SourceSpec("target", "folder", (str(tmp / "target"),)),),
                    model=ModelSpec(config=DEMO_MODEL_CONFIG), sketch=SketchConfig(k=32), bank=BankConfig(size=24),
                    curvature=CurvatureConfig(n_curv=60, hard_negatives=4), outputs=OutputConfig(dir=str(tmp / "out")))
    ingest_stage(list(cfg.pool) + list(cfg.target), Warehouse(cfg.warehouse))
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    return cfg, loaded, n


def test_image_reads_do_not_grow_with_shards_and_features_do_not_depend_on_them(pool):
    cfg, loaded, n = pool
    runs = {}
    for shard_size in (PAIRS_ROW_GROUP, 2 * PAIRS_ROW_GROUP, 100_000):
        wh = Warehouse(cfg.warehouse)  # a fresh counter
        out = featurize_stage(dataclasses.replace(cfg, shard_size=shard_size), wh, loaded, run_id=f"f{shard_size}")
        runs[shard_size] = (out, wh.image_rows_read["pairs"])
    assert [runs[s][0]["shards"] for s in sorted(runs)] == [3, 2, 1]
    assert all(out["pairs"] == n for out, _ in runs.values())
    reads = {s: r for s, (_, r) in runs.items()}
    # every pool pair once, plus the row groups holding bank members (here all of them); the target's never
    assert len(set(reads.values())) == 1 and n < reads[PAIRS_ROW_GROUP] <= 2 * n, reads

    wh = Warehouse(cfg.warehouse)
    feats = {s: read_features(wh, f"f{s}") for s in runs}
    ref = feats[PAIRS_ROW_GROUP]
    bank = load_bank(wh, f"f{PAIRS_ROW_GROUP}")
    for s, f in feats.items():
        assert f.pair_id == ref.pair_id
        for name in ("x", "y", "g", "p_corr", "margin", "clipscore", "loss"):
            np.testing.assert_array_equal(getattr(f, name), getattr(ref, name))
        assert load_bank(wh, f"f{s}").bank_id == bank.bank_id
        c, c0 = load_curvature(wh, f"f{s}"), load_curvature(wh, f"f{PAIRS_ROW_GROUP}")
        for name in ("phi_pos", "phi_neg", "fisher"):
            np.testing.assert_array_equal(getattr(c, name), getattr(c0, name))

    # the in-memory reference: every pool pair forwarded at once against the same bank
    ids = source_pair_ids(wh, cfg.pool)
    mem = Featurizer(EndpointModel(loaded.model), bank, cfg.sketch, cfg.featurize).featurize(
        *load_pairs(wh, ids, loaded), ids)
    mem = mem.take(np.argsort(np.asarray(mem.pair_id, dtype=str), kind="stable"))
    assert mem.pair_id == ref.pair_id
    np.testing.assert_array_equal(mem.to_arrow("float16").column("g").to_pylist(),
                                  ref.to_arrow("float16").column("g").to_pylist())


def test_decode_workers_do_not_change_a_byte(pool):
    """The input pipeline: with DataLoader workers decoding (2, and more workers than batches) the feature,
    trunk-output, bank and curvature files are the same bytes as decoding in the stage's own process."""
    cfg, loaded, n = pool
    wh = Warehouse(cfg.warehouse)

    def run(workers, shard_size=PAIRS_ROW_GROUP):
        run_id = f"workers-{workers}-{shard_size}"
        feat = dataclasses.replace(cfg.featurize, num_workers=workers)
        featurize_stage(dataclasses.replace(cfg, featurize=feat, shard_size=shard_size), wh, loaded, run_id=run_id)
        files = [p for t in ("features", "globals")
                 for p in sorted(glob.glob(f"{wh.root}/{t}/run={run_id}/**/*.*", recursive=True))]
        return {os.path.relpath(p, wh.root).replace(run_id, "RUN"): hashlib.sha256(open(p, "rb").read()).hexdigest()
                for p in files}

    base = run(0)
    assert len(base) >= 8  # three shards' features and trunk outputs, the bank and the curvature
    assert run(2) == base
    assert run(40) == base
    # workers and other shards at once: two parts instead of three, the same rows in them, and the same bank and
    # curvature files
    other = run(2, 2 * PAIRS_ROW_GROUP)
    run_wide = {k for k in base if k.startswith("globals/") and k.count("/") == 2}  # bank, curvature, shard plan
    assert {k: other[k] for k in run_wide if "shards" not in k} == {k: base[k] for k in run_wide if "shards" not in k}
    assert any("bank" in k for k in run_wide) and any("curv" in k for k in run_wide), sorted(base)
    a, b = read_features(wh, f"workers-0-{PAIRS_ROW_GROUP}"), read_features(wh, f"workers-2-{2 * PAIRS_ROW_GROUP}")
    assert a.pair_id == b.pair_id
    for name in ("x", "y", "g", "p_corr", "margin", "clipscore", "loss"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_streaming_score_and_selection_equal_the_in_memory_path(pool, tmp_path):
    """score_stage scores part by part and ranks out of core; materialize selects out of core. Both equal
    scoring the whole run in memory (score_features, scores_table) and select_top (subsets_table)."""
    import pyarrow.compute as pc

    from chips_core.scoring.score import Preconditioners, score_features
    from chips_core.stages import materialize_stage, score_stage
    from chips_core.stages.check import target_and_eval_features
    from chips_core.stages.common import require_pairs
    from chips_core.stages.materialize import subsets_table
    from chips_core.stages.score import scores_table

    cfg, loaded, n = pool
    cfg = dataclasses.replace(cfg, shard_size=64, budgets=(0.1, 0.25), outputs=OutputConfig(dir=str(tmp_path)))
    wh = Warehouse(cfg.warehouse)
    featurize_stage(cfg, wh, loaded, run_id="stream")
    assert len(wh.fs.glob(f"{wh.root}/features/run=stream/*.parquet")) == 5  # 64+64, 64+64, 44: scored in 5 parts
    out = score_stage(cfg, wh, loaded, "stream", run_id="score-stream")
    got = wh.read("scores", filter=pc.field("run_id") == "score-stream").drop_columns(["run"])

    bank = load_bank(wh, "stream")
    feat = Featurizer(EndpointModel(loaded.model), bank, cfg.sketch, cfg.featurize)
    tstats, _ = target_and_eval_features(cfg, wh, loaded, feat, require_pairs(wh, cfg.target, "target"))
    features, curv = read_features(wh, "stream"), load_curvature(wh, "stream")
    scores = score_features(features, tstats, curv, cfg.curvature, cfg.score,
                            Preconditioners.solve(tstats, curv, cfg.curvature))
    want = scores_table(features.pair_id, scores, "score-stream")
    assert out["pairs"] == n
    assert got.sort_by("pair_id").equals(want.sort_by("pair_id"))  # bit for bit, rank included

    mat = materialize_stage(cfg, wh, "score-stream", run_id="mat-stream")
    sub = wh.read("subsets", filter=pc.field("run_id") == "mat-stream").drop_columns(["run"])
    ref = subsets_table(features.pair_id, scores, cfg.budgets, cfg.methods, "mat-stream", "score-stream", full=True)
    key = [("subset_id", "ascending"), ("rank", "ascending")]
    assert sub.sort_by(key).equals(ref.sort_by(key))
    csv = tmp_path / "mat-stream" / "chips_at_0.1.csv"
    assert csv.read_text().count("\n") == 1 + int(np.ceil(0.1 * n)) and str(csv) in mat["files"]
