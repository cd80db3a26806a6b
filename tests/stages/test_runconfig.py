"""Run-config parsing: the device is resolved (and a missing CUDA device refused) before anything loads,
and the shipped example config parses."""
import json
from pathlib import Path

import pytest
import torch

from chips_core.errors import ConfigError
from chips_core.platform.provenance import config_json
from chips_core.stages.runconfig import load_run_config

BASE = {"warehouse": "/tmp/chips-never-created", "pool": [], "target": [], "model": {"name": "RN50"}}


def test_device_auto_resolves_and_is_recorded():
    cfg = load_run_config({**BASE, "device": "auto"})
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg.device == expected
    assert json.loads(config_json(cfg))["device"] == expected  # what every runs row records


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"device='cuda' is invalid: this machine has 0 CUDA device\(s\); use "
                                          "device: auto or cpu"):
        load_run_config({**BASE, "device": "cuda"})


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ConfigError, match=f"device='{device}'"):
        load_run_config({**BASE, "device": device})


def test_the_example_config_parses():
    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "example.yaml")
    assert cfg.device in ("cpu", "cuda") and cfg.score.plus_match_quantile == 0.25


def test_duckdb_memory_limit_is_a_size():
    assert load_run_config({**BASE, "duckdb_memory_limit": "2GiB"}).duckdb_memory_limit == "2GiB"
    with pytest.raises(ConfigError, match=r"duckdb_memory_limit='lots' is invalid: a size such as 256MB"):
        load_run_config({**BASE, "duckdb_memory_limit": "lots"})


def test_featurize_num_workers_is_checked_and_defaults_from_the_cpu_count(monkeypatch):
    from types import SimpleNamespace

    from chips_core.stages.common import featurize_workers

    assert load_run_config({**BASE, "featurize": {"num_workers": 3}}).featurize.num_workers == 3
    for bad in (-1, 1.5, True, "four"):
        with pytest.raises(ConfigError, match=r"num_workers=" + repr(bad).replace(".", r"\.")):
            load_run_config({**BASE, "featurize": {"num_workers": bad}})
    cfg = load_run_config(BASE)
    assert cfg.featurize.num_workers is None  # the default: from the machine
    for cores, cpu, gpu in ((2, 0, 1), (4, 0, 3), (16, 4, 15), (64, 16, 16)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert featurize_workers(cfg, SimpleNamespace(device="cpu")) == cpu
        assert featurize_workers(cfg, SimpleNamespace(device="cuda:0")) == gpu


def test_the_executor_block_is_checked_and_left_out_of_the_config_hash(tmp_path):
    import dataclasses

    from chips_core.errors import ConfigError
    from chips_core.platform.provenance import config_hash
    from chips_core.stages.runconfig import ExecutorConfig

    assert ExecutorConfig.parse("tcp://10.0.0.5:8786") == ExecutorConfig(kind="dask", address="tcp://10.0.0.5:8786")
    assert ExecutorConfig.parse("dask") == ExecutorConfig(kind="dask") and ExecutorConfig.parse("local").kind == "local"
    with pytest.raises(ConfigError, match=r"--executor 'cluster7'"):
        ExecutorConfig.parse("cluster7")
    with pytest.raises(ConfigError, match=r"ExecutorConfig.address='10.0.0.5:8786'"):
        ExecutorConfig(kind="dask", address="10.0.0.5:8786")
    with pytest.raises(ConfigError, match=r"ExecutorConfig.kind='spark'"):
        ExecutorConfig(kind="spark")
    with pytest.raises(ConfigError, match=r"ExecutorConfig.resources=\{'GPU': 0\}"):
        ExecutorConfig(kind="dask", resources={"GPU": 0})
    cfg = load_run_config({"warehouse": str(tmp_path / "wh"), "pool": [], "target": [], "model": {"name": "RN50"},
                           "executor": {"kind": "dask", "n_workers": 4, "resources": {"GPU": 1}}})
    assert cfg.executor == ExecutorConfig(kind="dask", n_workers=4, resources={"GPU": 1})
    # where the work runs does not change what it makes: a run killed on Dask resumes locally
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, executor=ExecutorConfig()))
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, shard_size=7))
