"""The CPT stage: continual pre-training of a model on a materialised subset (read from the
warehouse) or on a manifest file, with an optional replay stream from an ingested source
(``cpt.replay``), recorded as a ``cpt`` run whose inputs name the subset and the replay."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow.compute as pc

from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel, image_preprocess
from ..train.cpt import ImageFilePairs, PairData, train_cpt
from ..util import read_pair_table, resolve_image_path
from .common import model_fields, source_pair_ids
from .preflight import require_subset
from .runconfig import RunConfig


def subset_data(wh: Warehouse, subset_id: str, loaded: LoadedModel) -> ImageFilePairs:
    """The pairs of one materialised subset (``<score run>:<method>@<budget>``) in rank order — the order of
    its manifest, so ``cpt --subset X`` and ``cpt --manifest <X's manifest>`` train the same model — with
    images decoded on demand."""
    sub = wh.read("subsets", columns=["subset_id", "run_id", "pair_id", "rank"], filter=pc.field("subset_id") == subset_id)
    if sub.num_rows == 0:
        require_subset(wh, subset_id)
    for run in set(sub.column("run_id").to_pylist()):  # only a materialize run that succeeded has visible subsets
        status = wh.read("runs", columns=["status"], filter=pc.field("run_id") == run).column("status").to_pylist()
        if status != ["succeeded"]:
            raise KeyError(f"subset {subset_id!r} belongs to materialize run {run!r}, which did not succeed "
                           f"({status[0] if status else 'no runs row'}): materialize again")
    return pair_data(wh, sub.sort_by([("rank", "ascending"), ("pair_id", "ascending")]).column("pair_id").to_pylist(),
                            loaded)


def replay_data(wh: Warehouse, source: str, loaded: LoadedModel, exclude=()) -> ImageFilePairs:
    """Every pair ingested under ``source`` but those in ``exclude`` (a subset's own pairs, which must not
    meet themselves as in-batch negatives): the replay stream of ``cpt.replay``."""
    skip = set(exclude)
    ids = [i for i in source_pair_ids(wh, [source]) if i not in skip]
    if len(ids) < 1:
        known = sorted(set(wh.read("pair_sources", columns=["source"]).column("source").to_pylist()))
        raise KeyError(f"replay source {source!r} holds no pairs in the warehouse (sources: {known})")
    return pair_data(wh, ids, loaded)


def pair_data(wh: Warehouse, ids: list[str], loaded: LoadedModel) -> ImageFilePairs:
    """The warehouse's pairs ``ids``, in that order, images decoded on demand (a subset's, a replay's, a warm-up's)."""
    rows = wh.read_pairs(ids)
    return ImageFilePairs([r["image"] for r in rows], [r["caption"] for r in rows],
                          image_preprocess(loaded.model), loaded.tokenizer, ids)


def manifest_data(path: str | Path, loaded: LoadedModel, allowed_roots: Sequence[str] | None = None) -> ImageFilePairs:
    """The pairs of a manifest (Parquet or open_clip CSV/TSV with ``filepath`` and ``title``). Image paths follow
    the sources' rule: relative to the manifest's folder, and inside ``allowed_roots`` (default: that folder,
    which holds materialize's exported ``images/``)."""
    t = read_pair_table(path, "manifest")
    for col in ("filepath", "title"):
        if col not in t.column_names:
            raise KeyError(f"manifest {str(path)!r} has no column {col!r} (has {t.column_names})")
    files, titles = t.column("filepath").to_pylist(), t.column("title").to_pylist()
    base = Path(path).parent
    files = [resolve_image_path(f, base, allowed_roots, f"manifest {str(path)!r}") for f in files]
    return ImageFilePairs(files, titles, image_preprocess(loaded.model), loaded.tokenizer, files)


def cpt_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, data: PairData, out_dir: str | Path,
              subset_id: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
              progress: bool = False, manifest: str | None = None, warmup: str | None = None) -> dict:
    """Train ``loaded.model`` (in place) on ``data`` with ``cfg.cpt``; resumes from ``out_dir``'s checkpoints. The run
    records the subset, the ``manifest`` file or the ``warmup`` run it trained for (``mart_eval_by_selection`` names
    its method by it)."""
    run_id = run_id or new_run_id("cpt")
    replay = (replay_data(wh, cfg.cpt.replay.source, loaded, exclude=getattr(data, "ids", ()))
              if cfg.cpt.replay_per_batch else None)
    with recorded_run(wh, "cpt", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"subset_id": subset_id, **({"manifest": str(manifest)} if manifest else {}),
                              **({"warmup": warmup} if warmup else {}),
                              "data": data.fingerprint(), "out_dir": str(out_dir),
                              "replay": replay.fingerprint() if replay else None},
                      **model_fields(cfg, loaded)) as row:
        out = train_cpt(loaded.model, data, cfg.cpt, out_dir, device=cfg.device, progress=progress, replay=replay)
        row.update(rows_in=len(data), rows_out=out["steps"], rows_quarantined=0)
    return {"run_id": run_id, **out}
