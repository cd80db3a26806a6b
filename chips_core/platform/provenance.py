"""The ``runs`` table: one row per stage run, with what it read, how it was configured, what it made."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pyarrow as pa

from .. import __version__
from ..util import is_credential_name, register_secret, scrub
from .warehouse import SCHEMAS, Warehouse


def new_run_id(stage: str) -> str:
    return f"{stage}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def code_version() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"chips_core {__version__}"


def fingerprint(path_or_bytes) -> str:
    """sha256 of a file's bytes (or of bytes), for ``input_fingerprints``."""
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def input_fingerprint(path: str, storage_options: dict | None = None) -> str:
    """sha256 of a local file; size and modification time (or ETag) of a folder or remote object."""
    if "://" not in path and os.path.isfile(path):
        return "sha256:" + fingerprint(path)
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    info = fs.info(p)
    return f"{info.get('type')}:{info.get('size')}:{info.get('ETag') or info.get('mtime') or ''}"


def config_json(config) -> str:
    """A config (a dataclass, possibly nested, or a mapping) as canonical JSON with no secret in it, so none reaches
    the runs table, the published tables or the config hash: ``storage_options`` (credentials, endpoints) are left
    out at any depth; a value under a key named like a credential (password, secret, token, key, ...) and every
    value a ``secrets:`` entry names (dotted paths, e.g. ``publish.iceberg_catalog_uri``) becomes ``<secret>``;
    strings lose URI passwords and credential query parameters, and values resolved from ``${ENV:NAME}`` read
    ``${ENV:NAME}`` again (:func:`chips_core.util.scrub`)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    data = json.loads(json.dumps(data, default=str))  # plain dicts and lists (the same JSON as before)
    for path in data.get("secrets") or ():
        _redact_path(data, str(path).split("."))
    return json.dumps(_without_secrets(data), sort_keys=True, default=str)


def _redact_path(data, keys: list[str]) -> None:
    """Replace the value at a dotted path (list indices as numbers; ``*`` for every item) by ``<secret>``."""
    key, rest = keys[0], keys[1:]
    items = (list(data.items()) if isinstance(data, dict) else list(enumerate(data))
             if isinstance(data, (list, tuple)) else [])
    for k, v in items:
        if key != "*" and str(k) != key:
            continue
        if rest:
            _redact_path(v, rest)
        elif v is not None:
            for leaf in _leaves(v):
                register_secret(leaf)
            data[k] = "<secret>"


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, str):
        yield value


def _without_secrets(value):
    if isinstance(value, dict):
        return {k: ("<set>" if v else None) if k == "storage_options"
                else ("<secret>" if v not in (None, "", {}, []) else v) if is_credential_name(k)
                else _without_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_secrets(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


def config_hash(config) -> str:
    """Stable short hash of a config (the ``runs.config_hash`` column)."""
    data = json.loads(config_json(config))
    if isinstance(data, dict):
        data.pop("executor", None)  # where the work runs does not change what it makes
        data.pop("warmup", None)  # read by `chips warmup` alone, whose CPT rounds record their own cpt settings
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def process_id(pid: int | None = None) -> str:
    """``"<pid>:<start time>"`` of a process (the start time from ``/proc``, so a reused pid is told apart); the pid
    alone where ``/proc`` is absent."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return str(pid)


def _alive(process: str) -> bool:
    pid = int(process.split(":", 1)[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return ":" not in process or process_id(pid) == process


_RECONCILED: set[str] = set()  # warehouses this process has looked at for abandoned runs


def mark_abandoned(wh: Warehouse) -> list[str]:
    """Every ``running`` row of this host whose process is gone (killed, crashed, the machine restarted) becomes
    ``abandoned``, so that every run is accounted for: succeeded, failed or abandoned. Returns their run ids. Rows
    of other hosts are left alone (their processes cannot be probed from here)."""
    _RECONCILED.add(wh.root)
    if not wh.fs.exists(wh.table_dir("runs")):
        return []
    import pyarrow.compute as pc

    runs = wh.read("runs", filter=pc.field("status") == "running")
    host, out = socket.gethostname(), []
    for row in runs.to_pylist():
        proc = row.get("process")
        if row.get("host") != host or not proc or _alive(proc):
            continue
        row = {name: row.get(name) for name in SCHEMAS["runs"].names}
        row.update(status=f"abandoned: process {proc.split(':')[0]} on {host} ended without recording an outcome",
                   ended_at=dt.datetime.now(dt.timezone.utc))
        wh.write("runs", pa.Table.from_pylist([row], schema=SCHEMAS["runs"]), {"kind": row["stage"]}, row["run_id"])
        out.append(row["run_id"])
    return out


# the statuses of a run that was stopped rather than failing on its own: its process killed, Ctrl-C, or its
# connection to the Dask scheduler lost (distributed's FutureCancelledError or CommClosedError, whichever the
# driver's wait meets first)
INTERRUPTED = ("abandoned", "failed: KeyboardInterrupt", "failed: FutureCancelledError", "failed: CommClosedError")


def interrupted_run(wh: Warehouse, stage: str, config, *, inputs: dict | None = None, **fields) -> tuple[str, str] | None:
    """The run a rerun of the same command resumes: the latest ``stage`` run with this config (its hash), with
    ``inputs`` among its recorded inputs and these column values (the model's checksum, ...), when that run was
    interrupted (:data:`INTERRUPTED`: killed, or stopped by Ctrl-C), or when it succeeded but the command that started
    it (its parent run) was interrupted after it. ``(run_id, its status)``, or None when there is no such run or
    a later run of the same config has started since (a rerun never goes back past it). The stage decides what of
    the run it can keep (featurize: the shards whose pairs are unchanged)."""
    if wh.root not in _RECONCILED:
        mark_abandoned(wh)
    if not wh.fs.exists(wh.table_dir("runs")):
        return None
    import pyarrow.compute as pc

    runs = wh.read("runs", columns=["run_id", "parent_run_id", "stage", "status", "config_hash", "input_fingerprints",
                                    "started_at", *fields])
    rows = [r for r in runs.to_pylist()
            if r["stage"] == stage and r["config_hash"] == config_hash(config)
            and all(r.get(k) == v for k, v in fields.items())
            and (inputs or {}).items() <= json.loads(r.get("input_fingerprints") or "{}").items()]
    if not rows:
        return None
    latest = max(rows, key=lambda r: (r["started_at"], r["run_id"]))
    status = latest["status"] or ""
    if status.startswith(INTERRUPTED):
        return latest["run_id"], status
    parent = latest["parent_run_id"] and runs.filter(pc.field("run_id") == latest["parent_run_id"]).to_pylist()
    if status == "succeeded" and parent and (parent[-1]["status"] or "").startswith(INTERRUPTED):
        return latest["run_id"], f"succeeded, its {parent[-1]['stage']} run {parent[-1]['status'].split(':')[0]}"
    return None


def remove_unfinished(wh: Warehouse, tables=("subsets",)) -> list[str]:
    """Remove the parts of ``tables`` (partitioned by ``run=<id>``) whose run did not succeed and is not running:
    what a killed or failed materialize left (already invisible to ``stg_subsets``, ``cpt --subset`` and publish).
    Called by the next materialize run and by ``chips gc``. Returns the folders removed."""
    mark_abandoned(wh)
    import pyarrow.compute as pc

    keep = set()
    if wh.fs.exists(wh.table_dir("runs")):
        keep = set(wh.read("runs", columns=["run_id"], filter=pc.field("status").isin(["succeeded", "running"]))
                   .column("run_id").to_pylist())
    removed = []
    for table in tables:
        if not wh.fs.exists(wh.table_dir(table)):
            continue
        for folder in wh.fs.ls(wh.table_dir(table), detail=False):
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("run=") and name[4:] not in keep:
                wh.fs.rm(folder, recursive=True)
                removed.append(folder)
    return removed


@contextmanager
def recorded_run(wh: Warehouse, stage: str, config=None, *, run_id: str | None = None, parent_run_id: str | None = None,
                 inputs: dict | None = None, **fields):
    """Context manager yielding a mutable row. A ``running`` row (with this process's id) is written when the block
    starts, and replaced by the outcome when it ends: ``succeeded``, or ``failed`` (the error re-raised). A process
    killed in between leaves ``running``, which the next process's first stage run (or ``chips gc``) marks
    ``abandoned`` (:func:`mark_abandoned`: once per process and warehouse, since it reads the whole runs table).
    Set ``row["rows_in"]`` etc. inside."""
    if wh.root not in _RECONCILED:
        mark_abandoned(wh)
    row = {"run_id": run_id or new_run_id(stage), "parent_run_id": parent_run_id, "stage": stage, "status": "running",
           "config_json": config_json(config), "config_hash": config_hash(config),
           "input_fingerprints": json.dumps(inputs or {}, sort_keys=True), "code_version": code_version(),
           "host": socket.gethostname(), "started_at": dt.datetime.now(dt.timezone.utc), "process": process_id(),
           **fields}

    def write() -> None:
        # no secret at rest: an error message or an input path may carry a URI password or an ${ENV:} value
        full = {name: scrub(row.get(name)) if isinstance(row.get(name), str) else row.get(name)
                for name in SCHEMAS["runs"].names}
        wh.write("runs", pa.Table.from_pylist([full], schema=SCHEMAS["runs"]), {"kind": stage}, row["run_id"])

    write()
    try:
        yield row
        row["status"] = "succeeded"
    except BaseException as e:
        msg = str(e) or ("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else "")
        row["status"] = f"failed: {type(e).__name__}: {msg}"[:2000]
        raise
    finally:
        row["ended_at"] = dt.datetime.now(dt.timezone.utc)
        write()
