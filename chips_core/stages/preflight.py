"""Pre-flight checks: what a command can know is wrong before it loads a model or starts a flow, each
raised as one :class:`PreflightError` that names the source, path, warehouse or id.

- every source path exists, is readable, and its reader finds its columns and at least one record
  (the reader itself is asked, so the check and the ingest cannot disagree);
- the model checkpoint exists and loads as weights; the eval suite files exist and their image paths lie inside
  their ``allowed_roots``;
- the warehouse is writable (a probe file is written and removed), created only after the sources pass;
- a subset or run id a command names exists in the warehouse.

The device is checked when the config is loaded (``runconfig.resolve_device``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import fsspec
import pyarrow.compute as pc

from ..errors import ChipsError
from ..platform.readers import SchemaChangeError, SourceSpec, open_shard
from ..platform.warehouse import Warehouse
from .runconfig import RunConfig


class PreflightError(ChipsError, ValueError):
    """A command's input is missing, unreadable or malformed; found before any model or flow starts."""


def check_source(spec: SourceSpec, role: str) -> None:
    """Each of ``spec.paths`` exists, is readable, has its columns and holds at least one record."""
    for i, path in enumerate(spec.paths):
        where = f"{role} source {spec.name!r} ({spec.kind}) paths[{i}]={path!r}"
        try:
            fs, p = fsspec.core.url_to_fs(path)
            if not fs.exists(p):
                raise PreflightError(f"{where}: no such file or folder")
            if spec.kind == "folder" and not fs.isdir(p):
                raise PreflightError(f"{where}: is not a folder (a folder source holds images with .txt captions)")
            if spec.kind != "folder" and fs.isdir(p):
                raise PreflightError(f"{where}: is a folder; a {spec.kind} source lists its files")
            first = next(iter(open_shard(spec, path)), None)
        except (PreflightError, SchemaChangeError):
            raise
        except PermissionError as e:
            raise PreflightError(f"{where}: not readable ({e.strerror or e})") from None
        except Exception as e:  # noqa: BLE001 - whatever the reader or backend raises means the same here
            raise PreflightError(f"{where}: cannot be read: {type(e).__name__}: {e}") from None
        if first is None:
            what = "is an empty folder (no image with a caption file)" if spec.kind == "folder" else "holds no rows"
            raise PreflightError(f"{where}: {what}")


def check_sources(cfg: RunConfig, pool: bool = True, target: bool = True) -> None:
    for spec in (cfg.pool if pool else ()):
        check_source(spec, "pool")
    for spec in (cfg.target if target else ()):
        check_source(spec, "target")


def require_checkpoint(cfg: RunConfig) -> None:
    """A local checkpoint the config names exists (else the loader's CheckpointNotFoundError naming the path) and
    is a weights file (:func:`check_checkpoint`)."""
    if cfg.model.checkpoint and "://" not in cfg.model.checkpoint:
        if not Path(cfg.model.checkpoint).is_file():
            from ..scoring.endpoint import load_model

            load_model(cfg.model)
        check_checkpoint(cfg.model.checkpoint, "model.checkpoint")


def check_checkpoint(path: str | Path, what: str = "checkpoint") -> None:
    """``path`` is a file that loads as weights the way the model loader reads it (``torch.load`` with
    ``weights_only=True``, memory-mapped, nothing copied; or a safetensors header): a text file, a truncated save
    or a pickle of arbitrary objects is refused here, not after a flow started."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"{what} not found: {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        else:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # a legacy (non-zip) save cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the loader raises means the same here
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise PreflightError(f"{what} {str(path)!r} does not load as weights (torch.load, weights_only=True): "
                             f"{type(e).__name__}: {first}") from None


def check_eval_suites(cfg: RunConfig, config: str | Path) -> None:
    """``config`` (the file ``cfg`` came from) names eval suites; each local suite file exists, reads as a table
    and every image path in it follows the path rule (inside the suite's ``allowed_roots``), checked without
    opening an image."""
    from ..errors import ConfigError
    from ..util import read_pair_table, resolve_image_path

    if not cfg.eval_suites:
        raise PreflightError(f"{config}: no eval_suites configured (each: {{name, path, templates}})")
    for spec in cfg.eval_suites:
        if "://" in spec.path:
            continue
        if not Path(spec.path).is_file():
            raise PreflightError(f"eval suite file not found: {spec.path!r}")
        what = f"eval suite {spec.name!r}"
        try:
            t = read_pair_table(spec.path, what)
            col = "image" if "image" in t.column_names else "filepath"
            if col not in t.column_names:
                raise PreflightError(f"{what}: {spec.path} has no column 'image' or 'filepath' (has {t.column_names})")
            for src in t.column(col).to_pylist():
                if isinstance(src, str):
                    resolve_image_path(src, Path(spec.path).parent, spec.allowed_roots or None, what)
        except (PreflightError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable table, whatever the reader raises
            raise PreflightError(f"{what}: {spec.path} cannot be read: {type(e).__name__}: {e}") from None


def writable_warehouse(cfg: RunConfig) -> Warehouse:
    """The config's warehouse, created if absent, after a probe file was written to it and removed."""
    wh = cfg.open_warehouse()
    probe = wh.path(f".chips-write-probe-{os.getpid()}")
    try:
        with wh.fs.open(probe, "wb") as f:
            f.write(b"probe")
        wh.fs.rm(probe)
    except Exception as e:  # noqa: BLE001
        raise PreflightError(f"warehouse {cfg.warehouse!r} is not writable: {type(e).__name__}: {e}") from None
    return wh


def existing_warehouse(cfg: RunConfig) -> Warehouse:
    """The config's warehouse, which must exist (a command that reads runs or subsets from it)."""
    return cfg.open_warehouse(create=False)


def require_subset(wh: Warehouse, subset_id: str) -> None:
    """``subset_id`` is in the ``subsets`` table, written by a materialize run that succeeded, else a PreflightError
    listing some that are."""
    found = wh.read("subsets", columns=["run_id"], filter=pc.field("subset_id") == subset_id)
    if found.num_rows:
        for run in set(found.column("run_id").to_pylist()):
            status = wh.read("runs", columns=["status"], filter=pc.field("run_id") == run).column("status").to_pylist()
            if status != ["succeeded"]:
                raise PreflightError(f"subset {subset_id!r} belongs to materialize run {run!r}, which did not succeed "
                                     f"({status[0] if status else 'no runs row'}): materialize again")
        return
    known = sorted(set(wh.read("subsets", columns=["subset_id"]).column("subset_id").to_pylist()))
    raise PreflightError(f"subset {subset_id!r} is not in warehouse {wh.url!r} (known: {known[:8]}"
                         f"{' ...' if len(known) > 8 else ''}; list them with: chips sql -w {wh.url} "
                         "\"select distinct subset_id from stg_subsets\")")


def require_run(wh: Warehouse, run_id: str, stages: Sequence[str]) -> None:
    """``run_id`` is a succeeded run of one of ``stages``, else a PreflightError naming what there is."""
    runs = wh.read("runs", columns=["run_id", "stage", "status"]).to_pylist()
    mine = [r for r in runs if r["run_id"] == run_id]
    if any(r["stage"] in stages and r["status"] == "succeeded" for r in mine):
        return
    if mine:
        raise PreflightError(f"run {run_id!r} is a {mine[-1]['stage']} run with status {mine[-1]['status']!r}, "
                             f"not a succeeded {' or '.join(stages)} run")
    known = [r["run_id"] for r in runs if r["stage"] in stages and r["status"] == "succeeded"][-5:]
    raise PreflightError(f"run {run_id!r} is not in warehouse {wh.url!r} (recent {' / '.join(stages)} runs: {known})")
