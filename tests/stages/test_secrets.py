"""No secret at rest: planted in every config field that can carry one, it is found in no warehouse file (tables,
globals, published Delta and Iceberg rows, the Iceberg catalog) and in no error log."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import open_clip
import pytest

from chips_core.platform.provenance import config_json
from chips_core.platform.readers import SourceSpec
from chips_core.scoring.endpoint import LoadedModel, ModelSpec, state_dict_checksum
from chips_core.scoring.featurize import BankConfig
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig
from chips_core.stages import run_pipeline
from chips_core.stages.runconfig import OutputConfig, PublishConfig, RunConfig, load_run_config, resolve_env
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs
from chips_core.util import scrub
from flows.demo import write_folder

PLANT = "hunter2-PLANTED"


def _every_file_holding(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


def test_config_json_redacts_every_kind_of_secret(monkeypatch):
    monkeypatch.setenv("CHIPS_TEST_TOKEN", PLANT + "-env")
    data = {
        "warehouse": f"s3://bob:{PLANT}-wh@minio.local/wh",
        "storage_options": {"key": "AKIA", "secret": PLANT},
        "pool": [{"name": "p", "kind": "webdataset", "paths": [f"https://u:{PLANT}-src@host/a.tar",
                                                                 f"https://host/b.tar?X-Amz-Signature={PLANT}-sig&x=1"],
                  "storage_options": {"password": PLANT}}],
        "target": [{"name": "t", "kind": "folder", "paths": ["/data/eval"]}],
        "model": {"name": "ViT-B-32", "checkpoint": "${ENV:CHIPS_TEST_TOKEN}"},
        "publish": {"iceberg": True, "iceberg_catalog_uri": f"postgresql://alice:{PLANT}-cat@db.internal/cat"},
        "takedowns": [f"https://list:{PLANT}-td@host/optout.csv"],
        "eval_suites": [{"name": "s", "path": "/data/${ENV:CHIPS_TEST_TOKEN}/suite.parquet"}],
        "secrets": ["target.0.paths"],
    }
    cfg = load_run_config(data)
    assert cfg.model.checkpoint == PLANT + "-env"  # resolved for use
    text = config_json(cfg)
    assert PLANT not in text and "/data/eval" not in text, text
    rec = json.loads(text)
    assert rec["model"]["checkpoint"] == "${ENV:CHIPS_TEST_TOKEN}"
    assert rec["publish"]["iceberg_catalog_uri"] == "postgresql://alice:<redacted>@db.internal/cat"
    assert rec["target"][0]["paths"] == "<secret>" and rec["pool"][0]["storage_options"] == "<set>"
    assert rec["pool"][0]["paths"][1] == "https://host/b.tar?X-Amz-Signature=<redacted>&x=1"
    # a credential-named key in any mapping (a custom model config here) is redacted; tokenizer-like words are not
    assert json.loads(config_json({"model": {"config": {"api_key": PLANT, "hf_tokenizer_name": "bert"}}}))["model"] \
        == {"config": {"api_key": "<secret>", "hf_tokenizer_name": "bert"}}
    assert scrub(f"failed: could not open https://u:{PLANT}@h/x") == "failed: could not open https://u:<redacted>@h/x"


def test_unset_env_reference_is_a_one_line_config_error():
    from chips_core.errors import ConfigError

    with pytest.raises(ConfigError, match="CHIPS_NOT_SET_ANYWHERE"):
        resolve_env({"warehouse": "${ENV:CHIPS_NOT_SET_ANYWHERE}"})


@pytest.mark.slow
def test_planted_secrets_reach_no_table_and_no_published_row(tmp_path, demo_model, monkeypatch):
    write_folder(tmp_path / "pool", make_pairs(60, seed=31), 60)
    write_folder(tmp_path / "target", make_pairs(16, seed=32, scan_fraction=1.0, noise_fraction=0.0), 16)
    secret_dir = tmp_path / f"catalog-{PLANT}"
    secret_dir.mkdir()
    monkeypatch.setenv("CHIPS_TEST_CATALOG", str(secret_dir / "cat.db"))
    uri = resolve_env({"u": "sqlite:///${ENV:CHIPS_TEST_CATALOG}"})["u"]  # what load_run_config does
    cfg = RunConfig(warehouse=str(tmp_path / "wh"),
                    pool=(SourceSpec("pool", "folder", (str(tmp_path / "pool"),),
                                     storage_options={"password": PLANT, "auto_mkdir": False}),),
                    target=(SourceSpec("target", "folder", (str(tmp_path / "target"),)),),
                    model=ModelSpec(config=DEMO_MODEL_CONFIG), sketch=SketchConfig(k=32), bank=BankConfig(size=16),
                    curvature=CurvatureConfig(n_curv=30, hard_negatives=4), budgets=(0.2,), shard_size=30,
                    methods=("random", "chips", "chips_plus"), outputs=OutputConfig(dir=str(tmp_path / "out")),
                    publish=PublishConfig(delta=True, iceberg=True, iceberg_catalog_uri=uri))
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    out = run_pipeline(cfg, loaded)
    assert out["publish"]["rows"]["runs"] >= 5  # the runs rows went to Delta and Iceberg too
    assert _every_file_holding(tmp_path / "wh", PLANT) == []
    assert _every_file_holding(secret_dir, PLANT) == []  # the Iceberg catalog holds the rows' metadata, not the secret
    # a run that fails with the secret in its error message records it scrubbed
    from chips_core.platform.query import connect, query
    from chips_core.platform.warehouse import Warehouse
    from chips_core.platform.provenance import recorded_run

    wh = Warehouse(cfg.warehouse)
    with pytest.raises(OSError):
        with recorded_run(wh, "probe", cfg):
            raise OSError(f"cannot reach postgresql://alice:{PLANT}@db/cat or {secret_dir / 'cat.db'}")
    status = query(connect(wh), "select status from stg_runs where stage = 'probe'").column("status").to_pylist()
    assert status == ["failed: OSError: cannot reach postgresql://alice:<redacted>@db/cat or ${ENV:CHIPS_TEST_CATALOG}"]
    assert _every_file_holding(tmp_path / "wh", PLANT) == []
