"""The score stage: target statistics from the eval set (the model runs over the eval set only), then
every method's score for every featurized pool pair from the stored features, bank and curvature,
and the premise checks (``stages/check.py``) in the run's ``diagnostics_json``.

It streams: the preconditioners are solved once, then the features are scored part by part (memory of one
part, whatever the pool's size; a part already scored is skipped on a rerun), and DuckDB ranks the parts
into the run's ``scores`` part out of core (``platform/selection.py``)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import threading
from collections import deque
from functools import partial
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..platform.features import feature_parts, load_bank, load_curvature, read_feature_part, save_direction
from ..platform.provenance import interrupted_run, new_run_id, recorded_run
from ..platform.selection import unranked_dir, write_ranked_scores
from ..platform.warehouse import SCHEMAS, Warehouse
from ..scoring.endpoint import LoadedModel
from ..scoring.featurize import FeatureBatch, Featurizer
from ..scoring.identity import StreamSample
from ..scoring.premise import premise_checks
from ..scoring.score import Preconditioners, score_features, select_top
from ..util import progress as progress_bar
from ..util import gc_frozen, release_memory
from .check import target_and_eval_features
from .common import MapShards, endpoint_for, model_fields, require_bank_model, require_pairs
from .runconfig import RunConfig

log = logging.getLogger("chips")

T, R = TypeVar("T"), TypeVar("R")
UNRANKED = pa.schema([f for f in SCHEMAS["scores"] if f.name != "rank"])


def unranked_table(pair_ids, scores: dict, run_id: str) -> pa.Table:
    """One row per pair of a scoring run, every score; ``utility`` is the CHIPS score. ``pair_ids``: a sequence
    of strings or an Arrow string array (used as it is)."""
    ids = pair_ids if isinstance(pair_ids, pa.Array) else pa.array(list(pair_ids), pa.string())
    cols = {"pair_id": ids, "run_id": pa.repeat(pa.scalar(run_id, pa.string()), len(ids))}
    cols.update({name: np.asarray(scores[name], dtype=np.float64) for name in UNRANKED.names if name in scores})
    cols["utility"] = np.asarray(scores["chips"], dtype=np.float64)
    return pa.table(cols, schema=UNRANKED)


def scores_table(pair_ids, scores: dict, run_id: str) -> pa.Table:
    """:func:`unranked_table` with ``rank`` (1 = best utility, ties by pair id), in memory: the reference the
    stage's out-of-core ranking is held equal to, and a table for tests and small pools."""
    order = select_top(scores["chips"], pair_ids, 1.0)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return unranked_table(pair_ids, scores, run_id).append_column("rank", pa.array(rank, pa.int64()))


def score_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, featurize_run_id: str,
                run_id: str | None = None, parent_run_id: str | None = None, progress: bool = False,
                map_parts: MapShards | None = None) -> dict:
    """Every score for every pool pair of ``featurize_run_id`` against the config's target set. The feature
    parts are scored on ``score_threads`` threads in this process, or through ``map_parts`` (an orchestrator's
    map, e.g. Dask tasks: part ``n`` is ``fn(n, path)``, results in order; each task reads its part from the
    warehouse and writes its scores there, and sends back only its few premise-sample candidates)."""
    eval_ids = require_pairs(wh, cfg.target, "target")
    inputs = {"featurize_run_id": featurize_run_id, "eval_pairs": len(eval_ids)}
    resumed = interrupted_run(wh, "score", cfg, inputs=inputs, **model_fields(cfg, loaded)) if run_id is None else None
    if resumed:  # a rerun of the command that was killed or stopped: the parts it scored are kept
        log.info("score: resuming run %s (%s); the parts it scored are kept", *resumed)
    run_id = resumed[0] if resumed else run_id or new_run_id("score")
    with recorded_run(wh, "score", cfg, run_id=run_id, parent_run_id=parent_run_id, inputs=inputs,
                      **model_fields(cfg, loaded)) as row:
        bank = load_bank(wh, featurize_run_id)
        require_bank_model(loaded, bank, featurize_run_id)
        feat = Featurizer(endpoint_for(cfg, loaded), bank, cfg.sketch, cfg.featurize)
        tstats, eval_features = target_and_eval_features(cfg, wh, loaded, feat, eval_ids)
        curv = load_curvature(wh, featurize_run_id)
        pre = Preconditioners.solve(tstats, curv, cfg.curvature)
        save_direction(wh, run_id, pre.v_chips, featurize_run_id)  # for materialize's set-aware selectors
        release_memory()  # the eval set's activations: the streaming and the ranking should not stack on them
        sample = StreamSample(cfg.check.pool_sample, cfg.check.seed, FeatureBatch.concat)

        def score_part(item: tuple[int, str]) -> StreamSample:
            """Score one part (unless a rerun finds it scored); its candidates for the premise sample."""
            i, path = item
            features = read_feature_part(wh, path)
            features.identity.require_same(curv.identity, "feature part " + posixpath.basename(path))
            # named by position: a refresh's parts may come from several runs, whose file names repeat
            out = posixpath.join(unranked_dir(wh, run_id), f"part-{i:06d}.parquet")
            keys = None
            if not wh.fs.exists(out):
                scores = score_features(features, tstats, curv, cfg.curvature, cfg.score, pre)
                _write_unranked(wh, out, unranked_table(features.pair_id_array(), scores, run_id))
                # the `random` method's keys are the sample's when the two seeds agree (the default): hashed once
                keys = scores["random"] if cfg.score.random_seed == sample.seed else None
            local = StreamSample(sample.n, sample.seed, FeatureBatch.concat)
            local.offer(features.pair_id, features, keys, below=sample.worst)  # only pairs that can still enter
            return local

        parts = feature_parts(wh, featurize_run_id)
        if map_parts is not None:
            done_parts = map_parts(partial(_score_nth, score_part), parts)
        else:
            done_parts = bounded_map(score_part, list(enumerate(parts)), cfg.score_threads or os.cpu_count() or 1)
        # from here the collections skip what was alive after the full one above (libraries, model: 0.2 s each),
        # and torch's own threads are off: the parts run on score_threads threads, its pool under each would
        # oversubscribe the cores (row_dots widens float16 with torch)
        with gc_frozen(), torch_threads(1), contextlib.closing(_closable(done_parts)) as done:
            for local in progress_bar(done, enabled=progress, desc="score", unit="part", total=len(parts)):
                if local.ids:
                    sample.offer(local.ids, local.payload, local.keys)  # the part's keys, not hashed again
            release_memory()  # the parts' freed buffers (Arrow's pool, the threads' heaps): the ranking does not stack on them
            n = write_ranked_scores(wh, run_id, cfg.duckdb_memory_limit)
        premise = premise_checks(eval_features, tstats.eval_loss, sample.payload, len(bank.pair_ids), cfg.check)
        row.update(bank_id=bank.bank_id, rows_in=n, rows_out=n, rows_quarantined=0,
                   diagnostics_json=premise.to_json())
    return {"run_id": run_id, "pairs": n, "eval_pairs": len(eval_ids), "eval_loss": tstats.eval_loss,
            "premise_passed": premise.passed, "premise": premise.verdict()}


def _closable(items: Iterable[R]) -> Iterator[R]:
    """``items`` as a generator (closing it closes a generator it wraps: the map stops)."""
    yield from items


def _score_nth(score_part: Callable, n: int, path: str):
    """``map_parts``'s shape (``fn(n, path)``) for the score stage's per-part function."""
    return score_part((n, path))


def bounded_map(fn: Callable[[T], R], items: Sequence[T], threads: int) -> Iterator[R]:
    """``map(fn, items)`` in order on ``threads`` threads, at most ``2 * threads`` items in flight (memory of a
    few parts, whatever their number). NumPy and Parquet release the GIL, so the parts' reading and arithmetic
    use every core."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # closed early (the consumer failed) or an item failed: the items not started are not run
            for f in pending:
                f.cancel()


_TORCH_THREADS = {"lock": threading.Lock(), "users": 0, "before": 1}


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` within, restored when the last such block ends. torch keeps the
    setting per thread, taken from the process's default when a thread first uses torch: the calling thread and the
    threads started within (the score stage's pool) run on ``n``, and so does other torch work started meanwhile."""
    state = _TORCH_THREADS
    with state["lock"]:
        if state["users"] == 0:
            state["before"] = torch.get_num_threads()
            torch.set_num_threads(n)
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0:
                torch.set_num_threads(state["before"])


def _write_unranked(wh: Warehouse, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    # read once by the ranking pass, then removed: neither compressed nor dictionary-encoded (fast to write)
    pq.write_table(table, buf, compression="none", use_dictionary=False)
    wh.write_bytes(path, buf.getvalue())
