"""CPU smoke run of the whole scoring demo on a model it trains itself (house style 11)."""
import pytest

from chips_core.scoring.score import METHODS
from flows.demo import run_core_demo

pytestmark = pytest.mark.slow  # real Prefect runs / training: deselect with -m 'not slow'


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = run_core_demo(pool_size=256, eval_size=48, steps=40, budget=0.3, out_dir=str(tmp_path))
    assert (tmp_path / "demo_clip.pt").is_file()
    assert [r[0] for r in out["rows"]] == list(METHODS)
    assert len(out["features"]) == 256
    text = capsys.readouterr().out
    assert "Top pairs by CHIPS utility" in text and "chips" in text
