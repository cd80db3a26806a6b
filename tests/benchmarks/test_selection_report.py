"""The selection benchmark's verdicts are computed from result rows, not written by hand: check them
on hand-made rows where each claim is known to hold or not."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "selection_report", Path(__file__).resolve().parents[2] / "benchmarks" / "selection" / "report.py")
rep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rep)

BUDGETS = [0.1, 0.2, 0.3, 0.5]


def _row(method, budget, top1, general=0.5, seed=0, variant="main", target="fashion"):
    return {"target": target, "variant": variant, "method": method, "budget": budget, "seed": seed,
            "metrics": {f"{target}_test": {"zero_shot_top1": top1, "image_to_text_R@5": top1, "text_to_image_R@5": top1},
                        f"{target}_evalset": {"zero_shot_top1": top1},
                        "general_a": {"zero_shot_top1": general},
                        "general_b": {"image_to_text_R@5": general, "text_to_image_R@5": general}}}


def _rows(chips_gain=0.05, general_drop=None):
    rows = [_row("none", 0.0, 0.30, general=0.60)]
    for seed in (0, 1):
        for b in BUDGETS:
            base = 0.40 + 0.2 * b + 0.001 * seed
            for i, m in enumerate(("random", "clipscore", "dot", "trak")):
                rows.append(_row(m, b, base + 0.001 * i, general=0.50, seed=seed))
            rows += [_row("chips_align", b, base + 0.01, general=0.50, seed=seed),
                     _row("chips_align_learn", b, base + 0.02, general=0.50, seed=seed),
                     _row("chips", b, base + chips_gain, general=general_drop or 0.55, seed=seed)]
        rows.append(_row("full", 1.0, 0.60, seed=seed))
        for a, v in ((0.0, 0.40), (0.6, 0.45), (0.8, 0.46), (1.0, 0.41)):
            rows.append(_row("chips", 0.2, v, seed=seed, variant=f"alpha={a:g}"))
    return rows


def test_verdicts_follow_the_numbers():
    v = {s[:3]: ok for s, ok, _, _ in rep.hypotheses(_rows(), ["fashion"], BUDGETS)}
    # chips beats all baselines; 0.40+0.06+0.05=0.51 < 0.95*0.60 -> (2) fails; chips@10% 0.47 < random@50% 0.50
    assert v == {"(1)": True, "(2)": False, "(3)": False, "(4)": True, "(5)": True, "(6)": True}
    v = {s[:3]: ok for s, ok, _, _ in rep.hypotheses(_rows(chips_gain=0.015, general_drop=0.40), ["fashion"], BUDGETS)}
    # chips below align_learn breaks (4); general score 0.40 is the largest drop -> (6) fails
    assert v["(1)"] is True and v["(4)"] is False and v["(6)"] is False


def test_aggregate_mean_and_sample_std_over_seeds():
    agg = rep.aggregate(_rows())
    mean, std, n = agg[("fashion", "chips", 0.1)]
    assert n == 2 and mean == pytest.approx(0.4705) and std == pytest.approx(0.001 / 2 ** 0.5)
    assert rep.general_score(_row("x", 0.1, 0.3, general=0.7)) == pytest.approx(0.7)


def test_missing_measurements_are_reported_as_such():
    rows = [r for r in _rows() if r["method"] not in ("full",) and not r["variant"].startswith("alpha")]
    v = {s[:3]: ok for s, ok, _, _ in rep.hypotheses(rows, ["fashion"], BUDGETS)}
    assert v["(2)"] is None and v["(5)"] is None
    table = rep.method_table(rep.aggregate(rows), "fashion", BUDGETS)
    assert "**" in table and "| chips |" in table


def test_verdicts_are_given_per_target():
    rows = _rows() + [{**r, "target": "medical", "metrics": {k.replace("fashion", "medical"): v
                                                             for k, v in r["metrics"].items()}}
                      for r in _rows(chips_gain=-0.05)]
    res = {s[:3]: (ok, per) for s, ok, _, per in rep.hypotheses(rows, ["fashion", "medical"], BUDGETS)}
    assert res["(1)"] == (False, {"fashion": True, "medical": False})
    assert "fashion: **holds**; medical: **does not hold**" == rep.verdict_line(res["(1)"][1])


def test_noise_auc_is_mann_whitney_and_tabulates_per_target():
    from scipy.stats import mannwhitneyu

    assert rep.auc([2.0, 3.0], [1.0]) == 1.0 and rep.auc([1.0], [2.0, 3.0]) == 0.0
    assert rep.auc([1.0, 1.0], [1.0]) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 200), rng.normal(0, 1, 150)
    assert rep.auc(a, b) == pytest.approx(mannwhitneyu(a, b).statistic / (200 * 150))
    table = rep.noise_auc_table({"fashion": [{"chips": 0.6, "random": 0.5}, {"chips": 0.7, "random": 0.5}],
                                 "medical": []}, ["chips", "random"])
    assert table.splitlines()[0] == "| method | fashion |" and "| chips | 0.650 ± 0.071 |" in table


def test_goal_lines_need_the_margin_the_interval_and_the_retention():
    def rows(gain, spread, general):
        out = []
        for seed in (0, 1, 2):
            for m, v, g in (("random", 0.40, 0.50), ("random_in_domain", 0.42, 0.50),
                            ("chips_plus", 0.42 + gain + spread * (seed - 1), general)):
                out.append(_row(m, 0.1, v + 0.001 * seed, general=g, seed=seed,
                                variant="diagnostic" if m == "random_in_domain" else "main"))
        return out
    met = lambda r: [ok for _, ok in rep.goal_lines(r, "fashion", [0.1])]  # noqa: E731
    assert met(rows(0.03, 0.0, 0.50)) == [True, True, True]
    assert met(rows(0.01, 0.0, 0.50)) == [False, True, True]  # +1 over random_in_domain, +3 over random
    assert met(rows(0.03, 0.05, 0.50))[0] is False  # the mean clears 2 points but the interval spans 0
    assert met(rows(0.03, 0.0, 0.45))[2] is False  # general retention 5 points below random
    assert met(rows(0.03, 0.0, 0.485))[2] is True  # 1.5 points below: within the 2 allowed
    line = rep.goal_lines(rows(0.03, 0.0, 0.50), "fashion", [0.1])[0][0]
    assert line.startswith("fashion 10%: chips_plus − random_in_domain = +3.0 [")


def test_collapse_table_reads_image_mean_cosine_per_suite():
    rows = []
    for seed in (0, 1):
        r = _row("random", 0.1, 0.4, seed=seed)
        r["metrics"]["fashion_test"]["image_mean_cosine"] = 0.30 + 0.02 * seed
        r["metrics"]["general_a"]["image_mean_cosine"] = 0.10
        r["metrics"]["general_b"]["image_mean_cosine"] = 0.20
        rows.append(r)
    assert rep.collapse(rows[0], "target") == pytest.approx(0.30) and rep.collapse(rows[0], "general") == pytest.approx(0.15)
    tab = rep.collapse_table(rows, "fashion", [0.1])
    assert "| random | 31.0 ± 1.4 | 15.0 ± 0.0 |" in tab
    assert "chips " not in tab  # methods without the measurement are left out
    assert rep.collapse_table([_row("random", 0.1, 0.4)], "fashion", [0.1]) == ""


def test_retention_leaves_out_the_targets_own_domain():
    """After CPT on animal sheets the general_animals suite is trained, not retained: it is left out of that
    target's general score (and of nothing else's)."""
    row = _row("random", 0.1, 0.4, general=0.5, target="animal_sheets")
    row["metrics"]["general_animals"] = {"zero_shot_top1": 0.9, "image_mean_cosine": 0.9}
    assert rep.general_score(row) == pytest.approx(0.5)
    assert [s for s, _ in rep.general_suites(row)] == ["general_a", "general_b"]
    other = {**row, "target": "sheets", "metrics": {**row["metrics"], "sheets_test": row["metrics"]["animal_sheets_test"]}}
    assert rep.general_score(other) == pytest.approx((0.5 + 0.5 + 0.9) / 3)


def test_paired_differences_ignore_sweep_rows_and_pair_sweep_variants_by_seed():
    rows = _rows(chips_gain=0.05)
    # the α sweep's rows are also method chips at 20%: they must not stand in for the main chips row
    got = rep.paired(rows, "fashion", "chips", "random", 0.2)
    assert got["n"] == 2 and got["mean"] == pytest.approx(0.05)
    d = rep.paired_variants(rows, "fashion", "alpha=0.6", "alpha=0")
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.05) and d["sd"] == pytest.approx(0.0)
    assert rep.paired_variants(rows, "fashion", "alpha=0.7", "alpha=0")["n"] == 0
    (_, ok, evidence, _), = [h for h in rep.hypotheses(rows, ["fashion"], BUDGETS) if h[0].startswith("(5)")]
    assert ok and "α=0.6 45.0 (paired +5.0" in evidence
