"""``featurize.precision`` through the featurize stage, on CPU here and on CUDA where one is (``-m gpu``,
``benchmarks/gpu_check.sh``): a run killed between shards resumes to the same bytes at its precision; resuming it
at another precision is refused, and a refresh at another precision forwards every pair again (a run never mixes
two precisions' features)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib

import open_clip
import pytest

from chips_core.errors import IncompatibleFeaturesError
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import LoadedModel, state_dict_checksum
from chips_core.stages import featurize_stage, ingest_stage, load_run_config

from ..conftest import tiny_pipeline_config


def _digests(wh: Warehouse, run_id: str) -> dict[str, str]:
    return {p.rsplit("/", 1)[1]: hashlib.sha256(wh.fs.cat_file(p)).hexdigest()
            for p in sorted(wh.fs.glob(f"{wh.root}/features/run={run_id}/*.parquet"))}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_run_resumes_at_its_precision_and_refuses_another(tmp_path, demo_model, device):
    raw = tiny_pipeline_config(tmp_path, demo_model, 60, 12, seed=11, shard_size=20, sketch={"k": 32},
                               bank={"size": 16}, curvature={"n_curv": 20, "hard_negatives": 4},
                               featurize={"micro_batch": 8, "precision": "bf16"})
    cfg = load_run_config(raw)
    wh = Warehouse(cfg.warehouse)
    ingest_stage(list(cfg.pool) + list(cfg.target), wh)
    model = copy.deepcopy(demo_model).to(device)
    loaded = LoadedModel(model, open_clip.tokenizer.SimpleTokenizer(context_length=16), state_dict_checksum(model),
                         "demo", device=device)
    first = featurize_stage(cfg, wh, loaded, run_id="bf16")
    assert first["shards_written"] == 3
    whole = _digests(wh, "bf16")
    wh.fs.rm(f"{wh.root}/features/run=bf16/shard-00001.parquet")  # as if killed before its second shard
    assert featurize_stage(cfg, wh, loaded, run_id="bf16")["shards_written"] == 1
    assert _digests(wh, "bf16") == whole
    wh.fs.rm(f"{wh.root}/features/run=bf16/shard-00002.parquet")
    fp32 = dataclasses.replace(cfg, featurize=dataclasses.replace(cfg.featurize, precision="fp32"))
    with pytest.raises(IncompatibleFeaturesError, match="bf16"):
        featurize_stage(fp32, wh, loaded, run_id="bf16")  # resuming the bf16 run in fp32
    assert sorted(_digests(wh, "bf16")) == ["shard-00000.parquet", "shard-00001.parquet"]  # nothing was mixed in
    again = featurize_stage(fp32, wh, loaded, run_id="fp32", reuse="bf16")  # a refresh at another precision
    assert again["refresh"]["reused"] is False and "forwarded in bf16" in again["refresh"]["reason"]  # none of it
    assert again["shards_written"] == 3
