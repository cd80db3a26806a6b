"""Read-only SQL over the warehouse: DuckDB with the ``sql/`` views loaded.

``raw_<table>`` relations read the Parquet parts (Hive partitions), or given Arrow tables (tests feed
rows this way), or an empty table of the right schema when a table has no parts yet. The files in
``sql/staging`` become ``stg_*`` views, ``sql/marts`` ``mart_*`` views, ``sql/audits`` ``audit_*``
views. Queries are bound with driver parameters, and anything but a SELECT is refused.
A remote warehouse is read through its fsspec filesystem registered with DuckDB, so no DuckDB
extension (httpfs) has to be downloaded at run time.

Once the views exist the connection is **confined** (:func:`confine`): it reads files only under the
warehouse and its own spill directory, reaches no network, installs and loads no extension, and the
configuration is locked, so neither ``SET``/``RESET``/``PRAGMA`` nor a query can undo it. This holds for
every caller of :func:`connect` — ``chips sql``, a Prefect deployment parameter, a service passing user SQL.

It is also **bounded** (:class:`SqlLimits`, locked with the rest): DuckDB's ``memory_limit`` (default 1 GiB or a
quarter of the machine's memory, whichever is smaller) and ``max_temp_directory_size`` (its spill; default 2 GiB),
and :func:`query` fetches the result in batches, stops at ``max_rows`` (the rest is never computed where the plan
streams) and interrupts the connection after ``timeout_s``. A service that passes user SQL to :func:`connect`
inherits these defaults; it can pass tighter ones.
"""
from __future__ import annotations

import atexit
import glob
import os
import posixpath
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from ..errors import ChipsError
from .warehouse import SCHEMAS, Warehouse

_PREFIX = {"staging": "", "marts": "mart_", "audits": "audit_"}


class ReadOnlyQueryError(ChipsError, PermissionError):
    """A query that would write (or is not a single SELECT) was refused."""


class QueryLimitError(ChipsError, RuntimeError):
    """A query ran past its time limit, or past the memory or spill limit of its connection."""


def _default_memory_limit() -> str:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 << 30
    return f"{min(1 << 30, ram // 4) >> 20}MiB"


@dataclass(frozen=True)
class SqlLimits:
    """What one user query may use. ``memory_limit``: DuckDB's working memory (beyond it, spill); ``max_temp``:
    the most it may spill to disk; ``timeout_s``: wall-clock seconds before the query is interrupted (0: none);
    ``threads``: DuckDB's threads (0: DuckDB's default)."""

    memory_limit: str = _default_memory_limit()
    max_temp: str = "2GiB"
    timeout_s: float = 120.0
    threads: int = 0


def sql_dir() -> Path:
    """The ``sql/`` project: ``$CHIPS_SQL_DIR`` (read when called), else the repository's ``sql/``."""
    return Path(os.environ.get("CHIPS_SQL_DIR", Path(__file__).resolve().parents[2] / "sql"))


_SPILL: dict[int, str] = {}  # pid -> this process's spill directory


def _remove_spill(pid: int) -> None:
    if os.getpid() == pid:  # a forked child inherits the handler but not the directory
        shutil.rmtree(_SPILL.pop(pid, ""), ignore_errors=True)


def spill_dir() -> str:
    """DuckDB's temp (spill) directory for this process: the only writable place a connection has.
    One per process, shared by every connection, removed when the process exits (DuckDB removes its
    spill files on close but leaves the directory)."""
    pid = os.getpid()
    if pid not in _SPILL:
        _remove_stale_spills()
        _SPILL[pid] = tempfile.mkdtemp(prefix=f"chips-duckdb-{pid}-")
        atexit.register(_remove_spill, pid)
    return _SPILL[pid]


def _remove_stale_spills() -> None:
    """Spill directories of processes that died without running their exit handlers (killed, ``os._exit``):
    their spill files can be gigabytes. A directory whose process is alive (or is not ours to probe) is kept."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "chips-duckdb-*-*")):
        try:
            owner = int(os.path.basename(path).split("-")[2])
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def confine(con: duckdb.DuckDBPyConnection, allowed: list[str], limits: SqlLimits | None = None) -> None:
    """Read files only under ``allowed`` (directories, each ending in ``/``), no network, no extension
    install or autoload, bounded memory and spill (``limits``), then lock the configuration (DuckDB's "Securing
    DuckDB" settings)."""
    limits = limits or SqlLimits()
    con.execute("set temp_directory = ?", [spill_dir()])
    con.execute("set memory_limit = ?", [limits.memory_limit])
    con.execute("set max_temp_directory_size = ?", [limits.max_temp])
    con.execute("set enable_progress_bar = false")
    if limits.threads:
        con.execute(f"set threads = {int(limits.threads)}")
    con.execute("set allowed_directories = ?", [[*allowed, spill_dir() + "/"]])
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(f"set {setting} = false")
    con.execute("set lock_configuration = true")


def connect(wh: Warehouse | None = None, tables: dict[str, pa.Table] | None = None,
            limits: SqlLimits | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the warehouse's ``raw_*`` relations and the ``sql/`` views,
    confined to the warehouse and bounded by ``limits`` (see the module docstring)."""
    con = duckdb.connect(":memory:")
    tables = tables or {}
    if wh is not None and not wh.is_local:
        con.register_filesystem(wh.fs)
    for name, schema in SCHEMAS.items():
        if name in tables:
            con.register(f"raw_{name}", tables[name])
        elif wh is not None and wh.fs.exists(wh.table_dir(name)) and wh.fs.glob(
                posixpath.join(wh.table_dir(name), "**", "*.parquet")):
            con.execute(f"set variable chips_{name} = ?", [wh.url_of(posixpath.join(wh.table_dir(name), "**", "*.parquet"))])
            # by name with an empty table of the current schema: a column added since older parts were
            # written reads as NULL in them, so the views work on a warehouse written by an older version
            con.register(f"empty_{name}", schema.empty_table())
            con.execute(f"create view raw_{name} as select * from read_parquet(getvariable('chips_{name}'), "
                        f"hive_partitioning = true, union_by_name = true) union all by name select * from empty_{name}")
        else:
            con.register(f"raw_{name}", schema.empty_table())
    for folder, prefix in _PREFIX.items():
        for path in sorted((sql_dir() / folder).glob("*.sql")):
            con.execute(f"create view {prefix}{path.stem} as {path.read_text().strip().rstrip(';')}")
    limits = limits or SqlLimits()
    confine(con, [wh.url_of(wh.root).rstrip("/") + "/"] if wh is not None else [], limits)
    _TIMEOUTS[id(con)] = limits.timeout_s
    return con


_TIMEOUTS: dict[int, float] = {}  # connection id -> its SqlLimits.timeout_s (a DuckDB connection takes no attribute)
BATCH_ROWS = 8192


def query(con: duckdb.DuckDBPyConnection, sql: str, params: dict | list | None = None,
          max_rows: int | None = None, timeout_s: float | None = None) -> pa.Table:
    """Run one read-only SELECT with bound parameters; return an Arrow table (its first ``max_rows`` rows only, read
    in batches: memory of the rows kept, where the plan streams). Interrupted after ``timeout_s`` (default: the
    connection's ``SqlLimits.timeout_s``). ``query_rows`` also says whether rows were left out."""
    return query_rows(con, sql, params, max_rows, timeout_s)[0]


def query_rows(con: duckdb.DuckDBPyConnection, sql: str, params: dict | list | None = None,
               max_rows: int | None = None, timeout_s: float | None = None) -> tuple[pa.Table, bool]:
    """:func:`query`, and whether the result had more than ``max_rows`` rows (then they were not fetched)."""
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError as e:  # e.g. a shell argument with bytes that are not UTF-8
        raise ValueError(f"the query is not valid UTF-8 text (at character {e.start}): "
                         f"{sql.encode('utf-8', 'backslashreplace').decode()[:200]!r}") from None
    statements = con.extract_statements(sql)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        # the statement's own first word: DuckDB files INSTALL under LOAD
        kinds = [(s.query.split() or [s.type.name])[0].upper() for s in statements]
        raise ReadOnlyQueryError(f"only a single SELECT is allowed, got {kinds or 'nothing'}: {sql.strip()[:200]!r}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows={max_rows} must be >= 0")
    timeout = _TIMEOUTS.get(id(con), 0.0) if timeout_s is None else timeout_s
    timer = threading.Timer(timeout, con.interrupt) if timeout and timeout > 0 else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        reader = con.sql(sql, params=params or None).to_arrow_reader(BATCH_ROWS)  # streamed, not materialised
        batches, rows, more = [], 0, False
        for batch in reader:
            if max_rows is not None and rows + batch.num_rows > max_rows:
                batches.append(batch.slice(0, max_rows - rows))
                rows, more = max_rows, True
                break
            batches.append(batch)
            rows += batch.num_rows
        table = pa.Table.from_batches(batches, schema=reader.schema)
    except duckdb.InterruptException:
        raise QueryLimitError(f"the query ran past its time limit of {timeout:g} s (SqlLimits.timeout_s; "
                              "chips sql --timeout)") from None
    except duckdb.OutOfMemoryException as e:
        raise QueryLimitError(f"the query needs more than its memory and spill limits (SqlLimits.memory_limit, "
                              f"max_temp): {str(e).splitlines()[0][:200]}") from None
    finally:
        if timer:
            timer.cancel()
    return table, more


def run_audits(con: duckdb.DuckDBPyConnection) -> dict[str, pa.Table]:
    """Every audit's failing rows (an empty table means the audit passed)."""
    return {p.stem: query(con, f"select * from audit_{p.stem}") for p in sorted((sql_dir() / "audits").glob("*.sql"))}


def lineage(con: duckdb.DuckDBPyConnection, subset_id: str, pair_id: str) -> pa.Table:
    sql = (sql_dir() / "lineage" / "subset_pair_lineage.sql").read_text()
    return query(con, sql, {"subset_id": subset_id, "pair_id": pair_id})
