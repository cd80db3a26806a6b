"""The premise check over a real warehouse: it passes for a CLIP trained on the domain and fails, naming
the checks, for the same architecture untrained; every score run records it too."""
import json

import open_clip
import pytest
import torch

from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import LoadedModel, build_custom_model, state_dict_checksum
from chips_core.stages import check_stage, ingest_stage, load_run_config
from chips_core.train.synthetic import DEMO_MODEL_CONFIG

from ..conftest import tiny_pipeline_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("check")
    cfg = load_run_config(tiny_pipeline_config(tmp, demo_model, 200, 60, seed=21, sketch={"k": 64},
                                               bank={"size": 64}, check={"pool_sample": 128, "full_param_sample": 32,
                                                                         "full_param_bank": 16}))
    wh = Warehouse(cfg.warehouse)
    ingest_stage(list(cfg.pool) + list(cfg.target), wh)
    return cfg, wh


def _loaded(model):
    return LoadedModel(model, open_clip.tokenizer.SimpleTokenizer(context_length=16), state_dict_checksum(model), "m")


def test_check_passes_for_a_model_that_knows_the_target(setup, demo_model):
    cfg, wh = setup
    out = check_stage(cfg, wh, _loaded(demo_model))
    values = {c["name"]: c["value"] for c in out["checks"]}
    assert out["passed"], (out["verdict"], values)
    row = query(connect(wh), "select stage, diagnostics_json from stg_runs where run_id = $r",
                {"r": out["run_id"]}).to_pylist()[0]
    assert row["stage"] == "check" and json.loads(row["diagnostics_json"])["passed"] is True
    # the end-point vs full Spearman comes with its 95% interval over the sampled pairs
    sp = [c for c in json.loads(row["diagnostics_json"])["checks"] if c["name"] == "endpoint_vs_full_spearman"][0]
    assert sp["interval"][0] < sp["value"] < sp["interval"][1]


def test_check_fails_for_a_cold_model_and_says_what_to_do(setup):
    cfg, wh = setup
    torch.manual_seed(0)
    out = check_stage(cfg, wh, _loaded(build_custom_model(DEMO_MODEL_CONFIG).eval()))
    failing = {c["name"] for c in out["checks"] if c["passed"] is False}
    assert not out["passed"]
    assert {"eval_matching", "p_corr_over_chance", "mean_pairwise_cosine"} <= failing, out["verdict"]
    assert "warm it up" in out["verdict"]
