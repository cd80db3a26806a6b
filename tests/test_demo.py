"""CPU smoke run of the whole scoring demo on a model it trains itself (house style 11)."""
from chips_core.demo import run_demo
from chips_core.score import METHODS


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = run_demo(pool_size=256, eval_size=48, steps=40, budget=0.3, out_dir=str(tmp_path))
    assert (tmp_path / "demo_clip.pt").is_file()
    assert [r[0] for r in out["rows"]] == list(METHODS)
    assert len(out["features"]) == 256
    text = capsys.readouterr().out
    assert "Top pairs by CHIPS utility" in text and "chips" in text
