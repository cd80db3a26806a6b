"""An HTML report with PNG plots for one scoring run: what was scored, how the factors are
distributed, how utility relates to CLIP score, and what each subset selected."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .query import connect, query
from .warehouse import Warehouse

FACTORS = ("utility", "chips_align", "w_learn", "w_relevance", "clipscore", "trak")


def resolve_score_run(con, run_id: str) -> str:
    """A score run id as given, or the score run under a pipeline / rescore / materialize run."""
    rows = query(con, """
        select r.run_id from stg_runs r where r.stage = 'score' and (r.run_id = $id or r.parent_run_id = $id)
        union all
        select distinct s.score_run_id from stg_subsets s where s.run_id = $id""", {"id": run_id}).to_pylist()
    if not rows:
        raise KeyError(f"no scoring run found for {run_id!r} (give a score, materialize, pipeline or rescore run id)")
    return rows[0]["run_id"]


def _plots(con, score_run: str, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = query(con, f"select {', '.join(FACTORS)} from stg_scores where run_id = $r", {"r": score_run})
    cols = {c: scores.column(c).to_numpy() for c in FACTORS}
    figs = []

    fig, axes = plt.subplots(2, 3, figsize=(11, 6), dpi=100)
    for ax, name in zip(axes.flat, FACTORS):
        ax.hist(cols[name], bins=40, color="#3b6ea5")
        ax.set_title(name)
        ax.grid(alpha=.3)
    fig.suptitle("Distribution of each factor and score over the scored pool")
    fig.tight_layout()
    figs.append(("factors.png", "Distribution of each factor"))
    fig.savefig(out / figs[-1][0])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.8, 4.5), dpi=100)
    sc = ax.scatter(cols["clipscore"], cols["utility"], s=6, alpha=.5, c=cols["w_relevance"], cmap="viridis")
    fig.colorbar(sc, ax=ax, label="relevance weight w_R")
    ax.set_xlabel("CLIP score x·y")
    ax.set_ylabel("CHIPS utility")
    ax.set_title("Utility vs CLIP score")
    ax.grid(alpha=.3)
    fig.tight_layout()
    figs.append(("utility_vs_clipscore.png", "Utility vs CLIP score"))
    fig.savefig(out / figs[-1][0])
    plt.close(fig)

    sel = query(con, """
        select m.method, m.budget, m.source, m.selection_rate from mart_selection_by_source m
        join (select distinct subset_id from stg_subsets where score_run_id = $r) s using (subset_id)
        where m.method = 'chips' order by m.budget, m.source""", {"r": score_run}).to_pylist()
    if sel:
        budgets = sorted({r["budget"] for r in sel})
        sources = sorted({r["source"] for r in sel})
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        width = 0.8 / max(1, len(budgets))
        for i, b in enumerate(budgets):
            rate = [next((r["selection_rate"] for r in sel if r["budget"] == b and r["source"] == s), 0.0) for s in sources]
            ax.bar(np.arange(len(sources)) + i * width, rate, width, label=f"budget {b:g}")
        ax.set_xticks(np.arange(len(sources)) + width * (len(budgets) - 1) / 2, sources, rotation=20)
        ax.set_ylabel("share of the source selected")
        ax.set_title("CHIPS selection rate by source, per budget")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never on them
        ax.grid(alpha=.3, axis="y")
        fig.tight_layout()
        figs.append(("selection_by_source.png", "Selection rate by source"))
        fig.savefig(out / figs[-1][0])
        plt.close(fig)

    curves = query(con, "select method, budget, mean_utility, mean_clipscore from mart_budget_curves "
                        "where score_run_id = $r order by method, budget", {"r": score_run}).to_pylist()
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for method in sorted({c["method"] for c in curves}):
            pts = [c for c in curves if c["method"] == method]
            for ax, key in zip(axes, ("mean_utility", "mean_clipscore")):
                ax.plot([p["budget"] for p in pts], [p[key] for p in pts], marker="o", label=method)
        for ax, title in zip(axes, ("mean CHIPS utility of the subset", "mean CLIP score of the subset")):
            ax.set_xlabel("budget")
            ax.set_title(title)
            ax.grid(alpha=.3)
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.suptitle("Budget curves per method")
        fig.tight_layout()
        figs.append(("budget_curves.png", "Budget curves"))
        fig.savefig(out / figs[-1][0])
        plt.close(fig)
    share = query(con, """
        select m.method, m.budget, m.source, m.n_selected from mart_selection_by_source m
        join (select distinct subset_id from stg_subsets where score_run_id = $r) s using (subset_id)
        where m.method != 'full' order by m.budget, m.method, m.source""", {"r": score_run}).to_pylist()
    if share:
        budgets = sorted({r["budget"] for r in share})
        sources = sorted({r["source"] for r in share})
        methods = sorted({r["method"] for r in share})
        fig, axes = plt.subplots(1, len(budgets), figsize=(3.2 * len(budgets) + 2, 4), dpi=100, sharey=True,
                                 squeeze=False)
        colours = plt.get_cmap("tab10")
        for ax, b in zip(axes[0], budgets):
            n = {(r["method"], r["source"]): r["n_selected"] for r in share if r["budget"] == b}
            tot = np.array([sum(n.get((m, s_), 0) for s_ in sources) for m in methods], dtype=float)
            bottom = np.zeros(len(methods))
            for j, src in enumerate(sources):
                frac = np.array([n.get((m, src), 0) for m in methods]) / np.maximum(tot, 1)
                ax.bar(methods, frac, bottom=bottom, color=colours(j % 10), label=src)
                bottom += frac
            ax.set_title(f"budget {b:g}")
            ax.tick_params(axis="x", rotation=60, labelsize=8)
            ax.grid(alpha=.3, axis="y")
        axes[0][0].set_ylabel("share of the subset")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="source")
        fig.suptitle("What each subset is made of: share of each source, per method and budget")
        fig.tight_layout()
        figs.append(("source_share.png", "Source share of each subset"))
        fig.savefig(out / figs[-1][0])
        plt.close(fig)
    return figs


def _thumbnails(wh: Warehouse, con, score_run: str, out: Path, n: int = 8) -> str:
    """HTML: the ``n`` top and ``n`` bottom pairs by CHIPS utility with their images and factors."""
    from PIL import Image

    from ..util import open_rgb

    e = html.escape
    parts = []
    for title, order in (("The top pairs, as images", "asc"), ("The bottom pairs, as images", "desc")):
        rows = query(con, f"""select s.pair_id, p.caption, p.source, s.utility, s.chips_align, s.w_learn, s.w_relevance,
                                     s.clipscore from stg_scores s join stg_pairs p using (pair_id)
                              where s.run_id = $r order by s.rank {order} limit {int(n)}""", {"r": score_run}).to_pylist()
        if not rows:
            continue
        (out / "thumbs").mkdir(exist_ok=True)
        images = {r["pair_id"]: r["image"] for r in wh.read_pairs([r["pair_id"] for r in rows], ["image"])}
        cells = []
        for r in rows:
            name = f"thumbs/{r['pair_id'][:16]}.png"
            im = open_rgb(images[r["pair_id"]])
            im.thumbnail((128, 128), Image.LANCZOS)
            im.save(out / name)
            cells.append(f'<div class="thumb"><img src="{name}" alt=""><p>{e(r["caption"])}</p>'
                         f'<p class="f">{e(r["source"])} · U {r["utility"]:+.3g} · Â {r["chips_align"]:+.3g} · '
                         f'w_L {r["w_learn"]:.2f} · w_R {r["w_relevance"]:.2f} · x·y {r["clipscore"]:.2f}</p></div>')
        parts.append(f"<h2>{title}</h2><div class='grid'>{''.join(cells)}</div>")
    return "".join(parts)


def _evals_html(con, score_run: str) -> str:
    """The eval results of models trained on this run's subsets, beside the model before CPT (method none)."""
    rows = query(con, """
        select method, budget, suite, metric, avg(value) as value, count(*) as evals from mart_eval_by_selection
        where (score_run_id = $r or method = 'none')
          and (metric = 'zero_shot_top1' or metric like '%R@5')
        group by all order by budget, method, suite, metric""", {"r": score_run}).to_pylist()
    if not any(r["method"] != "none" for r in rows):
        return ("<h2>Evaluations</h2><p>No model trained on this run's subsets has been evaluated yet "
                "(<code>chips cpt … --subset …</code>, then the <code>chips eval</code> command it prints).</p>")
    e = html.escape
    cols = sorted({(r["suite"], r["metric"]) for r in rows})
    keyed = {(r["method"], r["budget"], r["suite"], r["metric"]): r["value"] for r in rows}
    head = "".join(f"<th>{e(s_)}<br>{e(m)}</th>" for s_, m in cols)
    body = ""
    for method, budget in sorted({(r["method"], r["budget"]) for r in rows}, key=lambda k: (k[1], k[0])):
        cells = "".join("<td>" + (f"{keyed[(method, budget, s_, m)]:.3f}" if (method, budget, s_, m) in keyed
                                  else "–") + "</td>" for s_, m in cols)
        body += f"<tr><td>{e(method)}</td><td>{budget:g}</td>{cells}</tr>"
    return (f"<h2>Evaluations</h2><p>Models trained on this run's subsets (mean over evals), and the model before "
            f"CPT (<code>none</code>); from <code>mart_eval_by_selection</code>.</p>"
            f"<table><tr><th>method</th><th>budget</th>{head}</tr>{body}</table>")


def _premise_html(diagnostics_json: str | None) -> str:
    """The premise checks of the score run (``scoring/premise.py``): verdict first, then each check."""
    if not diagnostics_json:
        return "<h2>Premise check</h2><p>not recorded for this run (scored by an older version)</p>"
    d, e = json.loads(diagnostics_json), html.escape
    colour = "#1a7f37" if d["passed"] else "#b42318"
    mark = {True: "ok", False: "FAIL", None: ""}
    value = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    rows = "".join(f"<tr><td>{e(c['name'])}</td><td>{value(c['value'])}</td><td>{e(c['threshold'])}</td>"
                   f"<td>{mark[c['passed']]}</td></tr>" for c in d["checks"])
    return (f'<h2>Premise check</h2><p style="color:{colour};font-weight:600">{e(d["verdict"])}</p>'
            f"<table><tr><th>check</th><th>value</th><th>passes when</th><th></th></tr>{rows}</table>")


def write_report(wh: Warehouse, run_id: str, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/index.html`` and its PNGs for the scoring run behind ``run_id``."""
    con = connect(wh)
    score_run = resolve_score_run(con, run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _plots(con, score_run, out)
    run = query(con, "select * from stg_runs where run_id = $r", {"r": score_run}).to_pylist()
    run = run[0] if run else {}
    top = query(con, """select p.caption, p.source, s.utility, s.chips_align, s.w_learn, s.w_relevance, s.clipscore
                        from stg_scores s join stg_pairs p using (pair_id) where s.run_id = $r order by s.rank limit 15""",
                {"r": score_run}).to_pylist()
    cfg = json.loads(run.get("config_json") or "{}")
    facts = [("scoring run", score_run), ("status", run.get("status")), ("pairs scored", run.get("rows_out")),
             ("model", f"{run.get('model_name')} ({(run.get('model_checksum') or '')[:12]})"),
             ("sketch", f"k={run.get('sketch_k')}, seed={run.get('sketch_seed')}"), ("bank", run.get("bank_id")),
             ("curvature", json.dumps(cfg.get("curvature"))), ("config hash", run.get("config_hash")),
             ("code version", run.get("code_version")), ("inputs", run.get("input_fingerprints"))]
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts)
    toprows = "".join(
        f"<tr><td>{i + 1}</td><td>{e(r['caption'])}</td><td>{e(r['source'])}</td><td>{r['utility']:+.4g}</td>"
        f"<td>{r['chips_align']:+.4g}</td><td>{r['w_learn']:.3f}</td><td>{r['w_relevance']:.3f}</td>"
        f"<td>{r['clipscore']:.3f}</td></tr>" for i, r in enumerate(top))
    imgs = "".join(f'<figure><img src="{f}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>' for f, t in figs)
    premise = _premise_html(run.get("diagnostics_json"))
    evals = _evals_html(con, score_run)
    thumbs = _thumbnails(wh, con, score_run, out)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>chips report {e(score_run)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1150px}} table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}} th{{background:#f3f3f3}}
figure{{margin:1.5em 0}} img{{max-width:100%;border:1px solid #eee}} figcaption{{color:#555}}
.grid{{display:flex;flex-wrap:wrap;gap:10px}} .thumb{{width:170px;font-size:12px}} .thumb img{{width:128px;
image-rendering:pixelated}} .thumb p{{margin:2px 0}} .f{{color:#555}}</style></head><body>
<h1>CHIPS scoring report</h1><table>{rows}</table>
{premise}
{evals}
<h2>Top pairs by utility</h2><table><tr><th>#</th><th>caption</th><th>source</th><th>utility</th><th>Â</th>
<th>w_L</th><th>w_R</th><th>CLIP score</th></tr>{toprows}</table>
{thumbs}
<h2>Plots</h2>{imgs}</body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
