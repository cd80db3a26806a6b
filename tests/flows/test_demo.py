"""CPU smoke run of the whole scoring demo on a model it trains itself (house style 11)."""
import pytest

from chips_core.scoring.score import METHODS
from flows.demo import run_core_demo

pytestmark = pytest.mark.slow  # real Prefect runs / training: deselect with -m 'not slow'


def test_demo_runs_end_to_end_with_the_cached_model_and_writes_nothing_unasked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHIPS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = run_core_demo(pool_size=256, eval_size=48, steps=40, budget=0.3)
    assert [r[0] for r in out["rows"]] == list(METHODS)
    assert len(out["features"]) == 256
    text = capsys.readouterr().out
    assert "training the demo CLIP (40 steps" in text and "Top pairs by CHIPS utility" in text
    assert (tmp_path / "cache" / "demo_clip_40.pt").is_file() and not any((tmp_path / "cwd").iterdir())
    again = run_core_demo(pool_size=256, eval_size=48, steps=40, budget=0.3, out_dir=str(tmp_path / "out"))
    assert "training the demo CLIP" not in capsys.readouterr().out  # the cache, as `chips demo` uses it
    assert (tmp_path / "out" / "demo_clip.pt").is_file()  # written only when asked
    assert again["rows"] == out["rows"]
