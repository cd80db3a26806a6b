"""``benchmarks/gpu_check.sh``, the one command a lent GPU runs (issue 12), run here as prepared for that:
``--device cpu --quick``. Its test subset passes, and its reports (precision agreement, end to end from shards)
are written to ``--out``; asked for CUDA where there is none it stops at once, saying so."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu_quick(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([str(SCRIPT), "--out", str(out), "--device", "cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests = (out / "tests.txt").read_text()
    assert " passed" in tests and "failed" not in tests
    precision = json.loads((out / "featurize_precision.json").read_text())
    assert precision, "no precision rows"
    assert (out / "featurize_precision.md").read_text().count("| demo | 256 | bf16 |") == 3  # chips, dot, clipscore
    shards = (out / "featurize_shards.md").read_text()
    assert "end to end" in shards and "pairs/s" in shards
    import torch

    assert f"cuda available {torch.cuda.is_available()}" in (out / "env.txt").read_text()


def test_gpu_check_refuses_cuda_where_there_is_none(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([str(SCRIPT), "--out", str(tmp_path / "gpu")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--device cuda but torch sees no CUDA device" in proc.stdout + proc.stderr
    assert not (tmp_path / "gpu" / "tests.txt").exists()  # stopped before the tests


def test_gpu_check_names_a_bad_argument(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--out", str(tmp_path), "--devices", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --devices" in proc.stderr
