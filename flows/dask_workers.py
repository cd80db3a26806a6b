"""Checks before a run sends shards to an existing Dask scheduler (``executor: {kind: dask, address: ...}``):
every worker runs the driver's Python, torch, open_clip and chips versions, and sees the model checkpoint and the
warehouse. Each mismatch is one line naming the worker and the value or path.

(Not named ``distributed.py``: Prefect puts ``flows/`` on ``sys.path`` when it loads a deployment's entrypoint,
and Dask's spawned worker processes would then import this module as the ``distributed`` package.)"""
from __future__ import annotations

import os
import platform

from chips_core.errors import ChipsError
from chips_core.stages.runconfig import RunConfig


class WorkerMismatchError(ChipsError, RuntimeError):
    """A Dask worker cannot run the run's shards as the driver would."""


def software() -> dict:
    """What must be equal on the driver and every worker for the shards' bytes to be the driver's."""
    import open_clip
    import torch

    import chips_core

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "chips": chips_core.__version__}


def _worker_facts(paths: dict[str, str], storage_options: dict | None, prefixes: tuple[str, ...] = ()) -> dict:
    """Run on each worker: its software and which of ``paths`` ({what: path or URL}) it can see. A URL named in
    ``prefixes`` (the warehouse) is seen when it exists or its bucket does: on an object store a prefix exists only
    once an object is under it, and a new warehouse has none yet."""
    import fsspec

    seen = {}
    for what, path in paths.items():
        try:
            if "://" in path:
                fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
                seen[what] = bool(fs.exists(p)) or (what in prefixes and bool(fs.exists(p.split("/", 1)[0])))
            else:
                seen[what] = os.path.exists(path)
        except Exception:  # noqa: BLE001 - unreachable is unreachable, whatever the backend raises
            seen[what] = False
    return {"software": software(), "seen": seen}


def check_workers(cfg: RunConfig, timeout: float = 30.0) -> list[str]:
    """Connect to ``cfg.executor.address`` and check every worker (:func:`_worker_facts`); returns their addresses.
    Raises :class:`WorkerMismatchError` naming the first worker that differs or cannot see a path, or the scheduler
    that cannot be reached or has no worker."""
    from distributed import Client

    address = cfg.executor.address
    paths = {"warehouse": cfg.warehouse}
    if cfg.model.checkpoint:
        paths["model.checkpoint"] = cfg.model.checkpoint
    try:
        client = Client(address, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - OSError, TimeoutError, ...: the scheduler is not there
        raise WorkerMismatchError(f"executor.address {address!r}: cannot reach the Dask scheduler "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    try:
        facts = client.run(_worker_facts, paths, cfg.storage_options, ("warehouse",))
    finally:
        client.close()
    if not facts:
        raise WorkerMismatchError(f"executor.address {address!r}: the Dask scheduler has no worker")
    ours = software()
    for worker, fact in sorted(facts.items()):
        for name, value in fact["software"].items():
            if value != ours[name]:
                raise WorkerMismatchError(f"Dask worker {worker} runs {name} {value}, the driver {ours[name]}: "
                                          "install the same versions on both")
        for what, ok in fact["seen"].items():
            if not ok:
                raise WorkerMismatchError(f"Dask worker {worker} cannot see {what} {paths[what]!r} (every worker "
                                          "reads the checkpoint and reads and writes the warehouse: use a shared "
                                          "path or a URL)")
    return sorted(facts)
