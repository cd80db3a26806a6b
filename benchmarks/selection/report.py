"""Tables, hypothesis verdicts and plots of the selection benchmark, from its result rows.

A result row (one CPT run, evaluated) is a dict::

    {"target": "fashion", "variant": "main" | "alpha=0.2" | "k=64", "method": "chips" | ... | "full" | "none",
     "budget": 0.1 (1.0 for full, 0.0 for none), "seed": 0, "pairs": 2000,
     "metrics": {suite: {metric: value}}, "seconds": 12.3}

``method == "none"`` is the general model before any CPT (the retention reference). Everything here
is a pure function of the rows, so the verdicts are testable on hand-made rows.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as t_dist

BASELINES = ("random", "clipscore", "dot", "trak")
ABLATIONS = ("chips_align", "chips_align_learn", "chips")
INFLUENCE = ("dot", "trak", "chips")
METHOD_ORDER = ("random", "clipscore", "dot", "trak", "chips_align", "chips_align_learn", "chips", "chips_plus",
                "chips_pursuit", "chips_infomax", "chips_cluster")
BEST = "chips_plus"  # the product's best selector, judged against issue 10's goals
PRIMARY = "zero_shot_top1"


def headline(m: dict) -> float:
    """A suite's headline metric: zero-shot top-1 where the suite has classes, else mean retrieval R@5."""
    return m[PRIMARY] if PRIMARY in m else 0.5 * (m["image_to_text_R@5"] + m["text_to_image_R@5"])


def target_metric(row: dict, metric: str = PRIMARY) -> float:
    m = row["metrics"][f"{row['target']}_test"]
    if metric == "retrieval_R@5":
        return 0.5 * (m["image_to_text_R@5"] + m["text_to_image_R@5"])
    return headline(m) if metric == PRIMARY else m[metric]


# general suites of a target's own domain: CPT on the target trains them, so they are no measure of retention
OWN_SUITES = {"animal_sheets": ("general_animals",)}


def general_suites(row: dict) -> list[tuple[str, dict]]:
    """The general suites that measure retention after CPT on ``row``'s target: every ``general_*`` suite but
    the target's own domain's (:data:`OWN_SUITES`)."""
    own = OWN_SUITES.get(row["target"], ())
    return [(s, m) for s, m in sorted(row["metrics"].items()) if s.startswith("general_") and s not in own]


def general_score(row: dict) -> float:
    """Mean over the general suites (:func:`general_suites`) of each suite's headline metric: zero-shot top-1
    where the suite has classes, else mean retrieval R@5."""
    vals = [headline(m) for _, m in general_suites(row)]
    return float(np.mean(vals)) if vals else float("nan")


def aggregate(rows, value=target_metric, variant: str = "main") -> dict:
    """``{(target, method, budget): (mean, std, n)}`` over seeds."""
    acc = defaultdict(list)
    for r in rows:
        if r["variant"] == variant:
            acc[(r["target"], r["method"], r["budget"])].append(value(r))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in acc.items()}


def _fmt(cell) -> str:
    if cell is None:
        return "–"
    mean, std, n = cell
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def method_table(agg: dict, target: str, budgets) -> str:
    head = "| method | " + " | ".join(f"{b:.0%}" for b in budgets) + " |\n|---|" + "---:|" * len(budgets) + "\n"
    lines = []
    for m in METHOD_ORDER:
        if not any((target, m, b) in agg for b in budgets):  # not in this run (e.g. v3 runs fewer methods)
            continue
        cells = [_fmt(agg.get((target, m, b))) for b in budgets]
        best = [max((agg[(target, mm, b)][0] for mm in METHOD_ORDER if (target, mm, b) in agg), default=None)
                for b in budgets]
        cells = [f"**{c}**" if agg.get((target, m, b)) and agg[(target, m, b)][0] == best[i] else c
                 for i, (c, b) in enumerate(zip(cells, budgets))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    full = agg.get((target, "full", 1.0))
    lines.append(f"| *full (100%)* | {_fmt(full)} |" + " |" * (len(budgets) - 1))
    none = agg.get((target, "none", 0.0))
    if none:
        lines.append(f"| *no CPT (general model)* | {_fmt(none)} |" + " |" * (len(budgets) - 1))
    return head + "\n".join(lines) + "\n"


def sweep_table(rows, target: str, prefix: str, value=target_metric) -> tuple[str, dict]:
    acc = defaultdict(list)
    for r in rows:
        if r["target"] == target and r["variant"].startswith(prefix + "="):
            acc[float(r["variant"].split("=")[1])].append(value(r))
    stats = {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in sorted(acc.items())}
    head = f"| {prefix} | " + " | ".join(f"{k:g}" for k in stats) + " |\n|---|" + "---:|" * len(stats) + "\n"
    return head + "| target metric (%) | " + " | ".join(_fmt(s) for s in stats.values()) + " |\n", stats


def _verdict(ok: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "not measured"}[ok]


def verdict_line(per_target: dict) -> str:
    """``fashion: **holds**; medical: **does not hold**``"""
    return "; ".join(f"{t}: {_verdict(ok)}" for t, ok in per_target.items()) or _verdict(None)


def hypotheses(rows, targets, budgets) -> list[tuple[str, bool | None, str, dict]]:
    """The paper's claims as ``(statement, holds overall?, evidence, {target: holds?})`` on the primary
    target metric (means over seeds). Overall: holds on every measured target; None if not measured."""
    agg = aggregate(rows)
    gen = aggregate(rows, general_score)
    small = [b for b in budgets if b <= 0.3 + 1e-9]

    def mean(t, m, b, a=agg):
        return a[(t, m, b)][0] if (t, m, b) in a else None

    def claim(statement, check):
        per, ev = {}, []
        for t in targets:
            flags = []
            for ok, text in check(t):
                flags.append(ok)
                ev.append(f"{t} {text}" + ("" if ok else " ✗"))
            if flags:
                per[t] = all(flags)
        overall = None if not per else all(per.values())
        return statement, overall, "; ".join(ev), per

    def c1(t):  # CHIPS beats every baseline at each budget <= 30%
        for b in small:
            c = mean(t, "chips", b)
            rivals = {m: mean(t, m, b) for m in BASELINES if mean(t, m, b) is not None}
            if c is not None and rivals:
                best = max(rivals, key=rivals.get)
                yield c > rivals[best], f"{b:.0%}: chips {100 * c:.1f} vs best baseline {best} {100 * rivals[best]:.1f}"

    def c2(t):  # CHIPS at 30% >= 95% of full
        c, f = mean(t, "chips", 0.3), mean(t, "full", 1.0)
        if c is not None and f is not None:
            yield c >= 0.95 * f, f"chips@30% {100 * c:.1f} / full {100 * f:.1f} = {c / f:.1%}"

    def c3(t):  # CHIPS at 10% beats random at 50%
        c, r = mean(t, "chips", 0.1), mean(t, "random", 0.5)
        if c is not None and r is not None:
            yield c > r, f"chips@10% {100 * c:.1f} vs random@50% {100 * r:.1f}"

    def c4(t):  # align < align x learn < chips at each budget <= 30%
        for b in small:
            v = [mean(t, m, b) for m in ABLATIONS]
            if None not in v:
                yield v[0] < v[1] < v[2], f"{b:.0%}: {100 * v[0]:.1f} < {100 * v[1]:.1f} < {100 * v[2]:.1f}"

    def c5(t):  # alpha in [0.6, 0.8] beats alpha = 0
        _, st = sweep_table(rows, t, "alpha")
        mids = {a: st[a][0] for a in st if 0.6 - 1e-9 <= a <= 0.8 + 1e-9}
        if 0.0 in st and mids:
            diffs = {a: paired_variants(rows, t, f"alpha={a:g}", "alpha=0") for a in mids}
            yield (all(v > st[0.0][0] for v in mids.values()),
                   f"@20%: α=0 {100 * st[0.0][0]:.1f}; " + ", ".join(
                       f"α={a:g} {100 * v:.1f}" + (f" (paired {fmt_paired(diffs[a])})" if diffs[a]["n"] > 1 else "")
                       for a, v in mids.items()))

    def c6(t):  # among influence methods, CHIPS loses the least general-domain performance
        base = mean(t, "none", 0.0, gen)
        for b in budgets:
            drops = {m: base - mean(t, m, b, gen) for m in INFLUENCE if base is not None
                     and mean(t, m, b, gen) is not None}
            if len(drops) == len(INFLUENCE):
                yield (drops["chips"] <= min(drops.values()) + 1e-12,
                       f"{b:.0%}: drop " + ", ".join(f"{m} {100 * d:.1f}" for m, d in drops.items()))

    return [claim("(1) CHIPS beats every baseline (random, clipscore, dot, trak) on the target at each budget ≤ 30%", c1),
            claim("(2) CHIPS at 30% reaches ≥ 95% of full-data CPT", c2),
            claim("(3) CHIPS at 10% beats random at 50%", c3),
            claim("(4) each factor helps: chips_align < chips_align_learn < chips (each budget ≤ 30%)", c4),
            claim("(5) α ∈ [0.6, 0.8] beats α = 0 (each of 0.6, 0.8)", c5),
            claim("(6) among influence methods (dot, trak, chips), CHIPS loses the least general-domain performance", c6)]


def plots(rows, targets, budgets, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    agg = aggregate(rows)
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.2), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for m in METHOD_ORDER:
            pts = [(b, agg[(t, m, b)]) for b in budgets if (t, m, b) in agg]
            if pts:
                ax.errorbar([100 * b for b, _ in pts], [100 * s[0] for _, s in pts], yerr=[100 * s[1] for _, s in pts],
                            marker="o", capsize=3, label=m, lw=2.2 if m == "chips" else 1.2)
        for m, style in (("full", "--"), ("none", ":")):
            if (t, m, 1.0 if m == "full" else 0.0) in agg:
                ax.axhline(100 * agg[(t, m, 1.0 if m == "full" else 0.0)][0], ls=style, color="k",
                           label="full data" if m == "full" else "no CPT")
        ax.set_title(f"target {t}: held-out headline metric")
        ax.set_xlabel("budget (% of pool)")
        ax.set_ylabel("headline metric (%): zero-shot top-1 or R@5")
        ax.grid(alpha=.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / "budget_curves.png", dpi=110)
    plt.close(fig)
    files.append("budget_curves.png")
    for prefix, xlabel in (("alpha", "α (negative-curvature share)"), ("k", "sketch dimension k")):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for t in targets:
            _, st = sweep_table(rows, t, prefix)
            if st:
                ax.errorbar(list(st), [100 * s[0] for s in st.values()], yerr=[100 * s[1] for s in st.values()],
                            marker="o", capsize=3, label=f"{t} test")
            _, ev = sweep_table(rows, t, prefix, lambda r: headline(r["metrics"][f"{r['target']}_evalset"]))
            if ev:
                ax.plot(list(ev), [100 * s[0] for s in ev.values()], ls="--", marker="x", label=f"{t} eval set")
        if prefix == "k":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("zero-shot top-1 / retrieval R@5 (%)")
        ax.set_title(f"CHIPS at 20%: {prefix} sweep")
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"sweep_{prefix}.png", dpi=110)
        plt.close(fig)
        files.append(f"sweep_{prefix}.png")
    return files


def retention_table(rows, target: str, budgets) -> str:
    gen = aggregate(rows, general_score)
    base = gen.get((target, "none", 0.0))
    head = "| method | " + " | ".join(f"{b:.0%}" for b in budgets) + " |\n|---|" + "---:|" * len(budgets) + "\n"
    lines = []
    for m in METHOD_ORDER + ("full",):
        bs = [1.0] if m == "full" else budgets
        if not any((target, m, b) in gen for b in bs):
            continue
        cells = []
        for b in bs:
            c = gen.get((target, m, b))
            cells.append("–" if c is None or not base else f"{_fmt(c)} ({100 * (c[0] - base[0]):+.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |" + " |" * (len(budgets) - len(bs)))
    note = f"General model before CPT: {_fmt(base)}; in brackets the change in points.\n\n" if base else ""
    return note + head + "\n".join(lines) + "\n"


def collapse(row: dict, which: str) -> float:
    """Mean pairwise cosine of image embeddings (``image_mean_cosine``) on the target test suite
    (``which="target"``) or averaged over the general suites (``"general"``); NaN where not measured."""
    if which == "target":
        vals = [row["metrics"].get(f"{row['target']}_test", {}).get("image_mean_cosine")]
    else:
        vals = [m.get("image_mean_cosine") for _, m in general_suites(row)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def collapse_table(rows, target: str, budgets) -> str:
    """Embedding collapse after CPT per method and budget: target test | general suites (mean cosine, x100)."""
    cells = {w: {**aggregate(rows, lambda r: collapse(r, w)),
                 **aggregate(rows, lambda r: collapse(r, w), variant="diagnostic")} for w in ("target", "general")}
    head = ("| method | " + " | ".join(f"{b:.0%} target | {b:.0%} general" for b in budgets) + " |\n|---|"
            + "---:|---:|" * len(budgets) + "\n")
    lines = []
    for m in ("none", *METHOD_ORDER, "random_in_domain", "random_clean", "full"):
        bs = [0.0] if m == "none" else [1.0] if m == "full" else budgets
        got = [(cells["target"].get((target, m, b)), cells["general"].get((target, m, b))) for b in bs]
        if all(t is None or np.isnan(t[0]) for t, _ in got):
            continue
        row = " | ".join(f"{_fmt(t)} | {_fmt(g)}" for t, g in got)
        lines.append(f"| {m} | {row} |" + " | |" * (len(budgets) - len(bs)))
    return head + "\n".join(lines) + "\n" if lines else ""


def fmt_seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def auc(pos, neg) -> float:
    """P(a random ``pos`` score > a random ``neg`` score), ties half (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def noise_auc_table(per_target: dict[str, list[dict]], methods) -> str:
    """Markdown: one row per method, one column per target, mean ± std of the per-seed AUCs."""
    targets = [t for t, runs in per_target.items() if runs]
    if not targets:
        return "(not measured)"
    lines = ["| method | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            v = np.array([run[m] for run in per_target[t] if m in run])
            cells.append(f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows: list[dict], target: str, method: str, baseline: str, budget: float, metric=target_metric) -> dict:
    """``method`` minus ``baseline`` per seed (same seed, same budget; main and diagnostic rows, not the
    sweeps' variants), their mean and the 95% t-interval half-width (None with fewer than 2 seeds)."""
    by = defaultdict(dict)
    for r in rows:
        if r["target"] == target and r["budget"] == budget and r["method"] in (method, baseline) \
                and r["variant"] in ("main", "diagnostic"):
            by[r["seed"]][r["method"]] = metric(r)
    return _paired_stats([v[method] - v[baseline] for v in by.values() if method in v and baseline in v])


def paired_variants(rows: list[dict], target: str, variant: str, baseline: str, metric=target_metric) -> dict:
    """A sweep variant (e.g. ``alpha=0.6``) minus another (``alpha=0``), paired by seed, as :func:`paired`."""
    by = defaultdict(dict)
    for r in rows:
        if r["target"] == target and r["variant"] in (variant, baseline):
            by[r["seed"]][r["variant"]] = metric(r)
    return _paired_stats([v[variant] - v[baseline] for v in by.values() if variant in v and baseline in v])


def _paired_stats(diffs) -> dict:
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return {"n": 0, "mean": float("nan"), "half": None, "sd": None}
    if len(d) < 2:
        return {"n": 1, "mean": float(d[0]), "half": None, "sd": None}
    sd = float(d.std(ddof=1))
    return {"n": len(d), "mean": float(d.mean()), "sd": sd, "half": float(t_dist.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d)))}


def fmt_paired(p: dict) -> str:
    if p["n"] == 0:
        return "—"
    if p["half"] is None:
        return f"{100 * p['mean']:+.1f} (1 seed)"
    lo, hi = p["mean"] - p["half"], p["mean"] + p["half"]
    mark = " ✓" if lo > 0 else (" ✗" if hi < 0 else "")
    return f"{100 * p['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def goal_lines(rows: list[dict], target: str, budgets, method: str = BEST, margin: float = 0.02,
               retention: float = 0.02) -> list[tuple[str, bool]]:
    """Issue 10's goals for ``method``, paired by seed: a mean at least ``margin`` above random-in-domain and
    above whole-pool random with the 95% interval above 0, and a mean general retention within ``retention``
    of random (all with the same replay). ``[(line, met)]``; a goal with fewer than 2 seeds is not met."""
    out = []
    for b in budgets:
        for base in ("random_in_domain", "random"):
            p = paired(rows, target, method, base, b)
            met = p["half"] is not None and p["mean"] >= margin and p["mean"] - p["half"] > 0
            out.append((f"{target} {b:.0%}: {method} − {base} = {fmt_paired(p)} points "
                        f"(goal ≥ +{100 * margin:.0f} with the interval above 0)", met))
        g = paired(rows, target, method, "random", b, general_score)
        met = g["half"] is not None and g["mean"] >= -retention
        out.append((f"{target} {b:.0%}: general retention, {method} − random = {fmt_paired(g)} points "
                    f"(goal: mean not below −{100 * retention:.0f})", met))
    return out
