"""The ``chips`` command line: demo, ingest, run, refresh, check, warmup, rescore, cpt, eval, sql, runs, report, gc,
server. Every error is one line on stderr and exit code 1 (the one boundary: :func:`_one_line_errors`); an unexpected
one also writes its traceback to a log file whose path the line names (``--debug`` prints it instead). Ctrl-C ends any command within
seconds with ``interrupted; rerun the same command to resume`` (the stage's run is recorded as failed).

Commands that run a stage check their inputs first (:mod:`chips_core.stages.preflight`): sources, warehouse,
ids, device — before any model is loaded or flow started. ``sql``, ``runs`` and ``report`` never start Prefect.

Prefect reads its settings from the environment when it is first imported, so ``flows.chips_flows``
is imported inside the commands, after :func:`main` and ``demo`` have set them."""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import duckdb
import polars as pl
import pyarrow as pa
import typer

from chips_core.errors import ChipsError
from chips_core.platform.query import connect
from chips_core.platform.query import SqlLimits, query_rows
from chips_core.platform.query import query as run_query
from chips_core.platform.report import write_report
from chips_core.platform.warehouse import Warehouse
from chips_core.util import scrub

# The stages, the model code and the demo import torch (seconds): each command imports them when it needs them,
# so the read commands (`sql`, `runs`, `report`) start in about a second.

app = typer.Typer(help="chips — CHIPS data selection for domain-adaptive CLIP, as a data platform. "
                       "Add --debug to any command to print tracebacks instead of one-line errors.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

INTERRUPTED = "interrupted; rerun the same command to resume"
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT = "180"  # Prefect's own 20 s is too short on a busy machine
_debug = False


def _log_traceback(exc: BaseException) -> Path:
    """Write ``exc``'s traceback to ``$CHIPS_LOG_DIR`` (default: the temp folder) and return the file."""
    folder = Path(os.environ.get("CHIPS_LOG_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"chips-error-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    # at rest, so without secrets (URI passwords, ${ENV:} values: chips_core.util.scrub)
    path.write_text(scrub(f"chips {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc))),
                    encoding="utf-8", errors="backslashreplace")  # an argument with undecodable bytes is logged too
    return path


def _prefect_startup_failed(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "attempting to connect to ephemeral Prefect API" in str(e)


@contextlib.contextmanager
def _one_line_errors():
    """Every error becomes one line and exit code 1: the ones a user causes (config, paths, ids, SQL) with
    their own message, anything else with its type, message and the log file holding the traceback."""
    try:
        yield
    except KeyboardInterrupt:  # the SIGINT handler printed the line already
        raise typer.Exit(code=130) from None
    except (ChipsError, FileNotFoundError, ValueError, KeyError, PermissionError, duckdb.Error) as e:
        if _debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, duckdb.Error) and not isinstance(e, ChipsError):
            msg = f"{type(e).__name__}: {e}"
        # one line, whatever the message holds (DuckDB's parser errors and YAML's span several)
        typer.echo(f"chips: error: {' '.join(str(msg).split())}", err=True)
        raise typer.Exit(code=1) from None
    except Exception as e:  # noqa: BLE001 - the boundary: nothing else reaches the user as a traceback
        if _debug:
            raise
        if _prefect_startup_failed(e):
            typer.echo(f"chips: error: the temporary Prefect API did not start within "
                       f"{os.environ.get(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT)} s (a busy machine?): set "
                       f"{STARTUP_TIMEOUT_ENV} higher, or keep one API running with `chips server` and set the "
                       "PREFECT_API_URL it prints", err=True)
            raise typer.Exit(code=1) from None
        if type(e).__module__.startswith("distributed") and type(e).__name__ in DASK_LOST:
            typer.echo("chips: error: the connection to the Dask scheduler was lost mid-run (executor.address; "
                       f"{type(e).__name__}); the shards finished so far are kept: with a scheduler and workers at that "
                       f"address again, rerun the same command to resume (traceback in {_log_traceback(e)})", err=True)
            raise typer.Exit(code=1) from None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        typer.echo(f"chips: error: {type(e).__name__}: {first} (traceback in {_log_traceback(e)}; "
                   "--debug prints it)", err=True)
        raise typer.Exit(code=1) from None


# what distributed raises in the driver when the scheduler goes away mid-run (by name: the CLI does not import it);
# the stage's run is recorded as interrupted, so the same command resumes (platform/provenance.py: INTERRUPTED)
DASK_LOST = ("FutureCancelledError", "CommClosedError")

_interrupts = 0


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: say so once, silence the shutdown noise (a terminal's Ctrl-C also stops the temporary Prefect
    API, and Prefect would retry reaching it for a minute), and exit within seconds; a second Ctrl-C exits at
    once. The KeyboardInterrupt raised here unwinds the stage, which records its run as failed."""
    global _interrupts
    _interrupts += 1
    if _interrupts > 1:
        os._exit(130)
    typer.echo(f"\nchips: {INTERRUPTED}", err=True)
    if not _debug:
        logging.disable(logging.CRITICAL)
        with contextlib.suppress(OSError):  # whatever Prefect prints while it gives up goes to a log file
            folder = Path(os.environ.get("CHIPS_LOG_DIR") or tempfile.gettempdir())  # where error logs go too
            folder.mkdir(parents=True, exist_ok=True)
            log = os.open(folder / f"chips-interrupt-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 2)
    watchdog = threading.Timer(8.0, os._exit, args=(130,))
    watchdog.daemon = True  # a command that unwinds sooner exits sooner
    watchdog.start()
    raise KeyboardInterrupt


def _warehouse_option():
    return typer.Option(..., "--warehouse", "-w", envvar="CHIPS_WAREHOUSE", help="warehouse path or fsspec URL")


def _executor_option():
    return typer.Option(None, "--executor", help="where ingest's and featurize's shards and score's parts run, overriding the config's "
                                                 "executor: "
                                                 "local, dask (a local cluster) or a scheduler address tcp://host:8786")


@app.command()
def run(config: Path = typer.Argument(..., help="pipeline YAML (every key: docs/config.md)"),
        executor: Optional[str] = _executor_option()) -> None:
    """Run the whole pipeline (ingest, featurize, score, materialize) as a Prefect flow."""
    _pipeline_command(config, refresh=False, executor=executor)


@app.command()
def refresh(config: Path = typer.Argument(..., help="pipeline YAML (every key: docs/config.md)"),
            executor: Optional[str] = _executor_option()) -> None:
    """The pipeline again, featurizing only what changed since this pool's last featurize run."""
    _pipeline_command(config, refresh=True, executor=executor)


def _pipeline_command(config: Path, refresh: bool, executor: str | None = None) -> None:
    """`chips run` / `chips refresh`: the pre-flight checks, the flow, the summary."""
    with _one_line_errors():
        from chips_core.stages.preflight import check_sources, require_checkpoint, writable_warehouse
        from chips_core.stages.runconfig import load_run_config, with_executor

        # the config file's values, with the flag's executor
        source: str | dict = str(config) if executor is None else with_executor(config, executor)
        cfg = load_run_config(source)  # fail fast, before any flow starts, with the bad key named
        check_sources(cfg)  # every source there, readable, with its columns and rows
        require_checkpoint(cfg)
        writable_warehouse(cfg)  # created only now, after the sources passed
        if cfg.executor.address:
            from flows.dask_workers import check_workers

            check_workers(cfg)  # the scheduler reachable, its workers like the driver, before any flow starts
        from flows.chips_flows import pipeline_flow, refresh_flow

        out = (refresh_flow if refresh else pipeline_flow)(source, progress=True)
    _summary(out, cfg)


@app.command("ingest")
def ingest_cmd(config: Path = typer.Argument(..., help="pipeline YAML (every key: docs/config.md)"),
               source: Optional[list[str]] = typer.Option(None, "--source", help="a source's name (repeatable); "
                                                          "default: every pool and target source")) -> None:
    """Ingest and validate sources into the warehouse: pool, target, or the config's other `sources:` (a replay
    stream for `cpt.replay`, warm-up pairs, ...)."""
    with _one_line_errors():
        from chips_core.stages.common import quarantine_shares
        from chips_core.stages.preflight import check_source, writable_warehouse
        from chips_core.stages.runconfig import load_run_config

        cfg = load_run_config(config)
        specs = [cfg.source(n) for n in source] if source else [*cfg.pool, *cfg.target]
        for spec in specs:
            check_source(spec, "source")
        writable_warehouse(cfg)
        from flows.chips_flows import ingest_on

        out = ingest_on(str(config))(str(config), [s.name for s in specs], progress=True)
        shares = quarantine_shares(cfg.open_warehouse(), specs)
    typer.echo(f"ingest {out['run_id']}: read {out['read']}, kept {out['kept']}, quarantined {out['quarantined']}, "
               f"unchanged {out['unchanged']}")
    _source_lines(out, shares)


def _premise_preflight(config: Path, no_ingest: bool) -> None:
    """What `check` and `warmup` need before a model loads: the sources (unless ingested already), the checkpoint,
    the warehouse (when ingested already), and a warehouse they can write."""
    from chips_core.stages.preflight import check_sources, existing_warehouse, require_checkpoint, writable_warehouse
    from chips_core.stages.runconfig import load_run_config

    cfg = load_run_config(config)
    if not no_ingest:
        check_sources(cfg)
    require_checkpoint(cfg)
    if no_ingest:
        existing_warehouse(cfg)
    writable_warehouse(cfg)


@app.command("check")
def check_cmd(config: Path = typer.Argument(..., help="pipeline YAML (its pool, target, model and `check` block)"),
              no_ingest: bool = typer.Option(False, "--no-ingest", help="the pool and target are ingested already")) -> None:
    """Premise check: can gradient-based selection be trusted with this model and target? Exit 2 if not."""
    with _one_line_errors():
        _premise_preflight(config, no_ingest)
        from flows.chips_flows import check_flow

        out = check_flow(str(config), ingest=not no_ingest)
    typer.echo(f"check {out['run_id']}:")
    from chips_core.scoring.premise import fmt_interval

    for c in out["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "    "}[c["passed"]]
        value = "n/a" if c["value"] is None else f"{c['value']:.3g}"
        typer.echo(f"  {mark} {c['name']:<28} {value:>8}{fmt_interval(c.get('interval'))}   ({c['threshold']})")
    typer.echo(out["verdict"])
    if not out["passed"]:
        raise typer.Exit(code=2)


@app.command("warmup")
def warmup_cmd(config: Path = typer.Argument(..., help="pipeline YAML (its pool, target, model, `cpt` and `warmup` "
                                                        "blocks)"),
               out: Path = typer.Option(..., "--out", "-o", help="folder for each round's CPT (round-N/final.pt)"),
               no_ingest: bool = typer.Option(False, "--no-ingest", help="the pool and target are ingested already")) -> None:
    """Warm a model up for the premise check: CPT rounds on in-domain pool pairs, the check after each, until it passes
    or `warmup.max_rounds`. Exit 2 if it does not pass; resumes from --out."""
    with _one_line_errors():
        _premise_preflight(config, no_ingest)
        _writable_dir(out, "--out")
        from flows.chips_flows import warmup_flow

        r = warmup_flow(str(config), str(out), ingest=not no_ingest, progress=True)
    typer.echo(f"warmup {r['run_id']}: " + (f"{r['pairs']} in-domain pairs ({r['gate']['in_domain']} of "
                                             f"{r['gate']['candidates']} candidates passed the relevance gate)"
                                             if r["gate"] else "the check passed before any round"))
    for n in r["rounds"]:
        typer.echo(f"  round {n['round']}: check {'passed' if n['passed'] else 'FAILED'}"
                   + (f" ({', '.join(n['failing'])} failing)" if n["failing"] else "") + f"; weights {n['final']}")
    typer.echo(r["verdict"])
    if not r["passed"]:
        raise typer.Exit(code=2)


@app.command()
def rescore(config: Path = typer.Argument(..., help="pipeline YAML whose `target` is the new evaluation set"),
            featurize_run_id: str = typer.Option(..., "--featurize-run", help="run id of the pool's featurization")) -> None:
    """Score an already featurized pool for a new target set (the model runs over the target only)."""
    with _one_line_errors():
        from chips_core.stages.preflight import (check_sources, existing_warehouse, require_checkpoint, require_run,
                                                 writable_warehouse)
        from chips_core.stages.runconfig import load_run_config

        cfg = load_run_config(config)
        check_sources(cfg, pool=False)
        require_checkpoint(cfg)
        require_run(existing_warehouse(cfg), featurize_run_id, ("featurize",))
        writable_warehouse(cfg)
        from flows.chips_flows import rescore_flow

        out = rescore_flow(str(config), featurize_run_id)
    s, m = out["score"], out["materialize"]
    typer.echo(f"rescore {out['run_id']}: {s['pairs']} pool pairs scored against {s['eval_pairs']} target pairs; "
               f"{len(m['subsets'])} subsets in {m['files'][0].rsplit('/', 1)[0] if m['files'] else '-'}")
    typer.echo(f"  {s['premise']}")


@app.command()
def cpt(config: Path = typer.Argument(..., help="pipeline YAML; its `model` is the start point, `cpt` the settings"),
        out: Path = typer.Option(..., "--out", "-o", help="folder for checkpoints, log.jsonl and final.pt"),
        subset: Optional[str] = typer.Option(None, help="a subset id from the warehouse, e.g. '<score run>:chips@0.3'"),
        manifest: Optional[Path] = typer.Option(None, help="or a manifest (Parquet / open_clip CSV: filepath, title)")) -> None:
    """Continual pre-training on a selected subset (resumes from --out's checkpoints if present)."""
    with _one_line_errors():
        from chips_core.stages.preflight import (existing_warehouse, require_checkpoint, require_subset,
                                                 writable_warehouse)
        from chips_core.stages.runconfig import load_run_config

        if (subset is None) == (manifest is None):
            raise ValueError("give exactly one of --subset / --manifest")
        if manifest is not None and not manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {str(manifest)!r}")
        cfg = load_run_config(config)
        require_checkpoint(cfg)
        if subset is not None:
            require_subset(existing_warehouse(cfg), subset)
        writable_warehouse(cfg)
        _writable_dir(out, "--out")
        from flows.chips_flows import cpt_flow

        r = cpt_flow(str(config), str(out), subset_id=subset, manifest=str(manifest) if manifest else None,
                     progress=True)
    resumed = f" (resumed at step {r['resumed_from_step']})" if r["resumed_from_step"] else ""
    typer.echo(f"cpt {r['run_id']}: {r['pairs']} pairs, {r['steps']} steps{resumed}, final loss {r['final_loss']:.4f}\n"
               f"  weights: {r['final']}\n"
               f"  next: chips eval {shlex.quote(str(config))} --checkpoint {shlex.quote(str(r['final']))} "
               f"--cpt-run {r['run_id']}" + (f" --subset {shlex.quote(subset)}" if subset else ""))


@app.command("eval")
def eval_cmd(config: Path = typer.Argument(..., help="pipeline YAML with `eval_suites`"),
             checkpoint: Optional[Path] = typer.Option(None, help="weights to evaluate (default: the config's model)"),
             cpt_run: Optional[str] = typer.Option(None, help="the cpt run that produced the checkpoint"),
             subset: Optional[str] = typer.Option(None, help="the subset that trained it (joins evals to the selection)")) -> None:
    """Zero-shot accuracy and retrieval recall@{1,5,10} on every configured suite -> the `evals` table."""
    with _one_line_errors():
        from chips_core.stages.preflight import (check_checkpoint, check_eval_suites, existing_warehouse,
                                                 require_checkpoint, require_run, require_subset, writable_warehouse)
        from chips_core.stages.runconfig import load_run_config

        cfg = load_run_config(config)
        if checkpoint is not None:
            check_checkpoint(checkpoint, "--checkpoint")
        else:
            require_checkpoint(cfg)
        check_eval_suites(cfg, config)
        wh = existing_warehouse(cfg)
        if subset is not None:
            require_subset(wh, subset)
        if cpt_run is not None:
            require_run(wh, cpt_run, ("cpt",))
        writable_warehouse(cfg)
        from flows.chips_flows import eval_flow

        r = eval_flow(str(config), str(checkpoint) if checkpoint else None, cpt_run, subset)
    typer.echo(f"eval {r['run_id']}:")
    _print_table(pa.Table.from_pylist([{k: m[k] for k in ("suite", "metric", "value", "n")} for m in r["metrics"]]), 200)


@app.command()
def demo(workdir: Path = typer.Option(Path("chips-demo"), help="where data, warehouse and outputs go"),
         pool_size: int = typer.Option(600, help="pool pairs"), eval_size: int = typer.Option(100, help="target pairs"),
         steps: int = typer.Option(300, help="training steps of the demo CLIP, if none is cached"),
         core: bool = typer.Option(False, "--core", help="the scoring library alone, in memory: no warehouse, "
                                                         "no Prefect (~20 s)")) -> None:
    """The embedded default: train (or reuse) a tiny CLIP, build a noisy pool and a 'scan' target set,
    and run the whole pipeline on them — no network, a few minutes on 2 CPUs."""
    from chips_core.stages.runconfig import load_run_config
    from flows.demo import prepare_demo, run_core_demo

    if core:  # the library alone, in memory: its model from the cache, nothing written to the workdir
        run_core_demo()
        return
    if "PREFECT_API_URL" not in os.environ and "prefect" not in sys.modules:
        # no server configured: keep the ephemeral API's database with the demo, so a ~/.prefect
        # written by another Prefect version cannot stop the demo from starting
        os.environ.setdefault("PREFECT_HOME", str(Path(workdir).resolve() / ".prefect"))
    t0 = time.perf_counter()
    cfg_dict = prepare_demo(workdir, pool_size, eval_size, steps)
    from flows.chips_flows import pipeline_flow

    out = pipeline_flow(cfg_dict, progress=True)
    _summary(out, load_run_config(cfg_dict), demo=True)
    typer.echo(f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Its config: {workdir.resolve() / 'demo.yaml'}")
    _next_steps(workdir.resolve(), out)


def _next_steps(workdir: Path, out: dict) -> None:
    """The commands a user runs next, in the order that works, each as printed: CPT on a subset (it prints the eval
    of the model it trains), eval of the model before CPT, the mart with every metric before and after, then the
    report (which then shows the evaluations beside the selection)."""
    q = shlex.quote
    cfg, wh, score = workdir / "demo.yaml", str(workdir / "warehouse"), out["score"]["run_id"]
    sid = f"{score}:chips_plus@0.3"
    mart = ("select suite, metric, method, budget, round(value, 3) as value from mart_eval_by_selection "
            "order by suite, metric, budget")
    typer.echo("\nNext steps (each works as printed, in this order):\n"
               f"  chips cpt {q(str(cfg))} --subset {q(sid)} --out {q(str(workdir / 'cpt-chips_plus-0.3'))}\n"
               "      (it prints the `chips eval` command for the model it trains: run that too)\n"
               f"  chips eval {q(str(cfg))}\n"
               "      (the model before CPT: method 'none' in the mart)\n"
               f"  chips sql -w {q(wh)} \"{mart}\"\n"  # the query holds no $, \" or `: double quotes keep it readable
               "      (every metric of the eval suites, before CPT ('none') and after: retrieval moves most here)\n"
               f"  chips report {out['run_id']} -w {q(wh)} --out {q(str(workdir / 'report'))}\n"
               "chips_plus is the recommended selector; the set-aware chips_pursuit (add it to methods: in "
               f"{q(str(cfg))}) beat it on one of our benchmark targets at 10-20% budgets (README, Which selector)")


@app.command("sql")
def sql_cmd(query: str = typer.Argument(..., help="one SELECT over the stg_*/mart_*/audit_* views"),
            warehouse: str = _warehouse_option(),
            limit: int = typer.Option(50, help="rows to fetch and print (the rest is not fetched)"),
            timeout: float = typer.Option(SqlLimits.timeout_s, help="seconds before the query is interrupted"),
            memory_limit: str = typer.Option(SqlLimits.memory_limit, help="DuckDB's working memory for the query "
                                                                           "(beyond it, it spills; at most 2GiB)"),
            fmt: str = typer.Option("table", "--format", help="table (for reading), csv (with a header) or json "
                                                                 "(one object per line): for scripts")) -> None:
    """Run a read-only SQL query over the warehouse (bounded: --limit rows, --timeout, --memory-limit)."""
    with _one_line_errors():
        if limit < 0:
            raise ValueError(f"--limit {limit}: must be >= 0")
        if fmt not in ("table", "csv", "json"):
            raise ValueError(f"--format {fmt!r}: use table, csv or json")
        con = connect(Warehouse(warehouse, create=False), limits=SqlLimits(memory_limit=memory_limit, timeout_s=timeout))
        table, more = query_rows(con, query, max_rows=limit)
    if fmt != "table":
        frame = pl.from_arrow(table)
        typer.echo(frame.write_csv() if fmt == "csv" else frame.write_ndjson(), nl=False)
        if more:
            typer.echo(f"(more than {limit} rows: raise --limit)", err=True)
        return
    _print_table(table, limit)
    if more:
        typer.echo(f"(the first {limit} rows; the query has more, not fetched: raise --limit to see them)", err=True)


@app.command()
def runs(warehouse: str = _warehouse_option(), stage: Optional[str] = typer.Option(None, help="only this stage")) -> None:
    """List stage runs (provenance), newest first."""
    sql = ("select run_id, stage, status, parent_run_id, rows_in, rows_out, rows_quarantined, started_at "
           "from stg_runs where $stage is null or stage = $stage order by started_at desc")
    with _one_line_errors():
        table = run_query(connect(Warehouse(warehouse, create=False)), sql, {"stage": stage})
    _print_table(table, 200)


@app.command()
def report(run_id: str = typer.Argument(..., help="a score, materialize, pipeline or rescore run id"),
           warehouse: str = _warehouse_option(),
           out: Path = typer.Option(None, help="output folder (default: chips-report-<run id>)")) -> None:
    """Write an HTML report with PNG plots for a scoring run."""
    with _one_line_errors():
        wh = Warehouse(warehouse, create=False)
        from chips_core.platform.report import resolve_score_run

        resolve_score_run(connect(wh), run_id)  # a bad id is refused before --out is created
        out = out or Path(f"chips-report-{run_id}")
        _writable_dir(out, "--out")
        page = write_report(wh, run_id, out)
    typer.echo(f"report: {page}")


@app.command()
def gc(warehouse: str = _warehouse_option()) -> None:
    """Account for killed runs and remove what they left: `running` rows whose process is gone become `abandoned`;
    subset parts of materialize runs that did not succeed (never visible to a reader) are removed."""
    with _one_line_errors():
        from chips_core.platform.provenance import mark_abandoned, remove_unfinished

        wh = Warehouse(warehouse, create=False)
        abandoned = mark_abandoned(wh)
        removed = remove_unfinished(wh)
    typer.echo(f"gc: {len(abandoned)} run(s) marked abandoned, {len(removed)} unfinished part folder(s) removed")


@app.command()
def server(port: int = typer.Option(4200, help="port of the local API (127.0.0.1 only)"),
           ui: bool = typer.Option(False, help="serve Prefect's web UI too")) -> None:
    """Keep one local Prefect API running (foreground; Ctrl-C stops it). Commands run with the PREFECT_API_URL it
    prints use it instead of starting a temporary API each (about 15-20 s each), for a working day."""
    url = f"http://127.0.0.1:{port}/api"
    typer.echo(f"chips server: a Prefect API at {url} (its database: PREFECT_HOME, default ~/.prefect).\n"
               f"In other shells:  export PREFECT_API_URL={url}\nCtrl-C stops it.", err=True)
    prefect = Path(sys.executable).with_name("prefect")
    args = [str(prefect) if prefect.is_file() else "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port), "--analytics-off", "--ui" if ui else "--no-ui"]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the server handles its own Ctrl-C
    os.execvp(args[0], args)


def _writable_dir(path: Path, what: str) -> None:
    """``path`` is (or can be made) a folder this process can write to, else a PreflightError naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".chips-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        from chips_core.stages.preflight import PreflightError

        raise PreflightError(f"{what} {str(path)!r} is not a writable folder: {e.strerror or e}") from None


def _print_table(table: pa.Table, limit: int) -> None:
    """Print as a polars table whose rows are never wrapped or cut (ids must survive a copy and paste)."""
    with pl.Config(tbl_rows=limit, tbl_cols=-1, fmt_str_lengths=1000, tbl_width_chars=65535):
        typer.echo(pl.from_arrow(table).head(limit))


def _source_lines(ingest: dict, shares: dict) -> None:
    """A line per source: this run's rows, then the source's whole record in the warehouse (a rerun reads every row
    again as unchanged, and the rows earlier runs quarantined stay quarantined), with stg_quarantine's causes."""
    for name, q in shares.items():
        run = ingest.get("sources", {}).get(name)
        now = (f"this run read {run['read']}, quarantined {run['quarantined']}" + (
            f" ({run['duplicates']} duplicates of pairs kept before, listed under this source too)"
            if run.get("duplicates") else "") + (
            f", unchanged {run['unchanged']}" if run["unchanged"] else "") + "; ") if run else ""
        causes = ", ".join(f"{r} × {n}" for r, n in sorted(q["causes"].items(), key=lambda kv: -kv[1])[:3])
        typer.echo(f"              {name}: {now}in the warehouse {q['quarantined']} of {q['rows']} rows quarantined "
                   f"({q['share']:.0%})" + (f": {causes}" if causes else ""))


def _summary(out: dict, cfg, demo: bool = False) -> None:
    con = connect(cfg.open_warehouse())
    i, f, s, m = out["ingest"], out["featurize"], out["score"], out["materialize"]
    typer.echo(f"\n{'Refresh' if out['run_id'].startswith('refresh') else 'Pipeline'} run {out['run_id']}")
    typer.echo(f"  ingest      read {i['read']}, kept {i['kept']}, quarantined {i['quarantined']}, unchanged {i['unchanged']}"
               f" (a source above {cfg.max_quarantine_share:.0%} quarantined stops the run)")
    _source_lines(i, out.get("quarantine", {}))
    typer.echo(f"  featurize   {f['pairs']} pool pairs in {f['shards']} shards (k={cfg.sketch.k}, "
               f"K={f.get('bank_size', cfg.bank.size)}" + (f", clipped from bank.size={cfg.bank.size}"
                                                          if f.get("bank_size", cfg.bank.size) < cfg.bank.size else "") + ")")
    if "refresh" in f:
        r = f["refresh"]
        typer.echo(f"              refresh of {r['reuse_of']}: {r['pairs_reused']} pairs' features reused, "
                   f"{r['pairs_forwarded']} forwarded" + (f"; curvature {r['curvature']} (pool grew {r['pool_growth']:.1%})"
                                                         if r["reused"] else f" ({r['reason']})"))
    elif out["run_id"].startswith("refresh"):
        typer.echo("              refresh: no earlier featurize run of this pool, every pair featurized")
    typer.echo(f"  score       {s['pairs']} pairs against {s['eval_pairs']} target pairs (eval loss {s['eval_loss']:.3f})")
    typer.echo(f"              {s['premise']}")
    if "takedown" in out:
        t = out["takedown"]
        typer.echo(f"  takedown    {t['keys']} listed keys: {t['pairs_taken_down']} pairs left out of every subset, "
                   f"{t['keys_unmatched']} keys matched nothing" + (f" (e.g. {', '.join(t['unmatched_examples'])})"
                                                                   if t["unmatched_examples"] else ""))
    typer.echo(f"  materialize {len(m['subsets'])} subsets")
    if "publish" in out:
        p, where = out["publish"], []
        delta = [u for k, u in p["tables"].items() if not k.startswith("iceberg:")]
        if delta:  # the folder the Delta tables were written under (a URL for a remote warehouse)
            where.append(f"Delta ({delta[0].rsplit('/', 1)[0]})")
        if any(k.startswith("iceberg:") for k in p["tables"]):
            where.append("Iceberg (" + ", ".join(u for k, u in p["tables"].items() if k.startswith("iceberg:")) + ")")
        rows = ", ".join(f"{n} {t} rows" for t, n in p["rows"].items())
        typer.echo(f"  publish     {rows} to {' and '.join(where)}")
    # the five best first, then their captions: joining every score to every pair first held the whole pool in
    # DuckDB (+99 MiB at 1M pairs, measured alone)
    top = run_query(con, "with s as (select pair_id, rank, utility, chips_align, w_learn, w_relevance from stg_scores "
                         "where run_id = $r order by rank limit 5) select p.caption, s.utility, s.chips_align, "
                         "s.w_learn, s.w_relevance from s join stg_pairs p using (pair_id) order by s.rank",
                    {"r": s["run_id"]})
    typer.echo("\nTop pairs by CHIPS utility (alignment x learnability x relevance):")
    for r in top.to_pylist():
        typer.echo(f"  {r['utility']:+9.3g}  A={r['chips_align']:+.3g} wL={r['w_learn']:.2f} wR={r['w_relevance']:.2f}  {r['caption']!r}")
    sizes = run_query(con, "select method, budget, count(*) as n from stg_subsets where score_run_id = $r "
                           "group by all order by method, budget", {"r": s["run_id"]})
    typer.echo("\nSubset sizes: " + ", ".join(f"{r['method']}@{r['budget']:g}={r['n']}" for r in sizes.to_pylist()
                                              if r["method"] in ("chips", "chips_plus", "random")) + " (all methods in stg_subsets)")
    if demo:
        share = run_query(con, """
            select sub.method, sub.budget,
                   avg(case when p.caption similar to '.*(scan|x-ray).*' then 1.0 else 0.0 end) as scan_share
            from stg_subsets sub join stg_pairs p using (pair_id)
            where sub.score_run_id = $r group by all order by sub.budget, scan_share desc""", {"r": s["run_id"]})
        typer.echo("\nShare of 'scan' captions picked (the target domain), per method and budget:")
        for r in share.to_pylist():
            typer.echo(f"  {r['method']:<18} {r['budget']:>4g}  {r['scan_share']:.0%}")
    out_dir = Path(cfg.outputs.dir) / m["run_id"]
    typer.echo(f"\nWarehouse: {cfg.warehouse}\nManifests (Parquet + open_clip CSV): {out_dir}")
    typer.echo(f"GX Data Docs: {Path(cfg.warehouse) / 'data_docs' / 'chips.html'} (works offline; GX's own "
               "index.html beside it needs network)")
    typer.echo("Try:\n  chips sql -w " + str(cfg.warehouse) +
               " \"select cause, count(*) n from stg_quarantine group by cause order by n desc\"")


def main(argv: list[str] | None = None) -> None:
    global _debug
    argv = list(sys.argv[1:] if argv is None else argv)
    _debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # An ephemeral API started by this process would try to send usage telemetry (offline here: it
    # can only fail, and once logged a 'database is locked' traceback in the demo's output).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    sys.exit(_run_app(argv))


def entry() -> None:
    """The ``chips`` console script: :func:`main`, then the exit handlers (Prefect's log and event queues are drained,
    DuckDB's spill folder removed), then the process ends without the interpreter's teardown. In that teardown a
    native library's thread (torch, DuckDB, Arrow: C++) could meet the finalizing interpreter and abort the process
    (SIGABRT, "terminate called ... FATAL: exception not rethrown", exit code 134) after a command had finished and
    printed its summary: a scheduler then reads a finished run as a failed one (seen in 3 of about 40 ``chips run``
    exits, in tests/test_guide.py and by hand). In-process callers (tests, notebooks) call :func:`main`."""
    import atexit

    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None), as the interpreter would end them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    with contextlib.suppress(Exception):
        threading._shutdown()  # join the non-daemon threads, as the interpreter does first when it exits
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _run_app(argv: list[str]) -> int:
    """The app, with the parser's usage errors (an unknown option, a missing argument, a value of the wrong type,
    an unknown command) as one line and exit code 1 like every other error; bare ``chips`` still prints the help.
    (typer carries its own click: its errors derive from ``typer.TyperException``.)"""
    try:
        rv = app(args=argv, prog_name="chips", standalone_mode=False)
    except typer.Abort:  # the parser's own Ctrl-C / EOF at a prompt
        typer.echo(f"\nchips: {INTERRUPTED}", err=True)
        return 130
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `chips` alone: the help, as before
            e.show()
            return e.exit_code
        msg = " ".join(e.format_message().split())  # one line, whatever the message's wrapping
        where = getattr(getattr(e, "ctx", None), "command_path", None) or "chips"
        typer.echo(f"chips: error: {msg} (see `{where} --help`)", err=True)
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    entry()
