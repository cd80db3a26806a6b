"""What the stages share: how shard work is mapped, the model fields of a ``runs`` row, and reading
a set of sources' pairs as model inputs."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..errors import IncompatibleFeaturesError
from ..platform.poolscan import quarantine_causes, source_key_counts
from ..platform.readers import SourceSpec
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import EndpointModel, LoadedModel, image_preprocess, resolve_precision
from ..scoring.featurize import ReferenceBank
from ..util import open_rgb, usable_cores
from .runconfig import RunConfig

T = TypeVar("T")
ShardFn = Callable[[int, Sequence[str]], T]
MapShards = Callable[[ShardFn, Sequence[Sequence[str]]], Iterable[T]]


def local_map(fn: ShardFn, shards: Sequence[Sequence[str]]) -> Iterable[T]:
    """The default executor: shard ``n`` is ``fn(n, shards[n])``, one after another in this process.
    An orchestrator passes its own (the Prefect flows pass a mapped task), yielding results in order."""
    return (fn(n, shard) for n, shard in enumerate(shards))


class WriteBehind:
    """Writes on one background thread while the caller goes on (featurize: shard ``n``'s part is written while
    shard ``n + 1`` is read, decoded and forwarded). At most one write is in flight: :meth:`submit` first finishes
    the previous one, and a failed write is raised there or by :meth:`wait`. A caller that calls :meth:`wait`
    before building its next outputs (featurize does) holds one shard's outputs at a time."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="chips-writer")
        self._pending: Future | None = None

    def submit(self, fn: Callable[[], object]) -> None:
        self.wait()
        self._pending = self._pool.submit(fn)

    def wait(self) -> None:
        """Until the submitted write is done; its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the last write (its error is not raised: call :meth:`wait` first to see it) and stop the thread."""
        self._pool.shutdown(wait=True)


def model_fields(cfg: RunConfig, loaded: LoadedModel) -> dict:
    """The ``runs`` columns that say which model and sketch a stage ran with."""
    return {"model_name": loaded.label, "model_checksum": loaded.checksum, "sketch_seed": cfg.sketch.seed,
            "sketch_k": cfg.sketch.k}


def source_pair_ids(wh: Warehouse, sources: Sequence[SourceSpec | str]) -> list[str]:
    """Distinct pair ids recorded under any of the sources (specs or names), sorted (the canonical order). The
    filter is applied as ``pair_sources`` is scanned: memory of the sources' ids, not of the whole table."""
    names = [s if isinstance(s, str) else s.name for s in sources]
    t = wh.read("pair_sources", columns=["pair_id"], filter=pc.field("source").isin(names))
    return sorted(set(t.column("pair_id").to_pylist()))


def _count_pairs_upto(wh: Warehouse, sources: Sequence[SourceSpec | str], limit: int) -> int:
    """Distinct pair ids recorded under the sources, counted up to ``limit`` (streamed: stops once reached)."""
    names = pa.array([s if isinstance(s, str) else s.name for s in sources], pa.string())
    seen: set[str] = set()
    for batch in wh.scan("pair_sources", columns=["pair_id", "source"]):
        seen.update(batch.filter(pc.is_in(batch.column("source"), names)).column("pair_id").to_pylist())
        if len(seen) >= limit:
            break
    return len(seen)


REASON_HINTS = {"path_outside_root": "list the images' folder in the source's allowed_roots",
                "missing_image_file": "check the image paths (relative paths resolve against the CSV's folder)"}


def _named(cause: str) -> str:
    """``read_error (path_outside_root)`` -> ``path_outside_root``; another reason as it is."""
    return cause.partition("(")[2].rstrip(")") if cause.startswith("read_error (") else cause


def _why(counts: dict[str, int]) -> str:
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    why = ("quarantined at ingest: " + ", ".join(f"{r} × {n}" for r, n in top)) if top else ""
    hints = [REASON_HINTS[_named(r)] for r, _ in top if _named(r) in REASON_HINTS]
    return why + (f" (fix: {hints[0]})" if hints else "")


def require_pairs(wh: Warehouse, sources: Sequence[SourceSpec], what: str, minimum: int = 2,
                  ids: bool = True) -> list[str] | None:
    """The sources' pair ids, or one ValueError naming the sources and, when ingest quarantined their rows,
    the top reasons with counts and what to do — before any model time is spent on a run that cannot score.
    With ``ids=False`` only the check: ``pair_sources`` is read batch by batch until ``minimum`` distinct ids are
    seen, and None is returned (listing a 1M-pair pool's ids was the peak of a whole `chips run`, outside every
    stage)."""
    found = source_pair_ids(wh, sources) if ids else None
    held = len(found) if ids else _count_pairs_upto(wh, sources, minimum)
    if held >= minimum:
        return found
    names = [s.name for s in sources]
    counts: dict[str, int] = {}
    for per in quarantine_causes(wh, names).values():
        for r, n in per.items():
            counts[r] = counts.get(r, 0) + n
    why = _why(counts)
    raise ValueError(f"{what} sources {names} hold {held} pairs; need at least {minimum}" + (f"; {why}" if why else ""))


def quarantine_shares(wh: Warehouse, sources: Sequence[SourceSpec | str]) -> dict[str, dict]:
    """Per source: ``{"rows", "quarantined", "share", "causes"}`` over every source key recorded for it
    (kept, duplicate or quarantined; duplicates do not count as quarantined)."""
    names = [s if isinstance(s, str) else s.name for s in sources]
    kept = source_key_counts(wh, names)
    causes = quarantine_causes(wh, names)
    out = {}
    for name in names:
        bad = sum(causes.get(name, {}).values())
        rows = kept.get(name, 0) + bad
        out[name] = {"rows": rows, "quarantined": bad, "share": bad / rows if rows else 0.0,
                     "causes": causes.get(name, {})}
    return out


def require_quarantine_share(wh: Warehouse, sources: Sequence[SourceSpec], limit: float) -> dict[str, dict]:
    """Stop a run whose source lost more than ``limit`` of its rows to quarantine (all of them always
    stops it), with one ValueError naming the source, its top causes with counts and the fix; else the
    shares (:func:`quarantine_shares`)."""
    shares = quarantine_shares(wh, sources)
    for name, s in shares.items():
        if s["rows"] and (s["share"] > limit or s["quarantined"] == s["rows"]):
            raise ValueError(f"source {name!r}: {s['quarantined']} of {s['rows']} rows ({s['share']:.0%}) "
                             f"{_why(s['causes'])}; above max_quarantine_share={limit:g}")
    return shares


def load_pairs(wh: Warehouse, ids: Sequence[str], loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (preprocessed) and tokenized captions for ``ids``, in the order of ``ids``."""
    return model_inputs(wh.read_pairs(ids), loaded)


def model_inputs(rows: pa.Table | list[dict], loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (preprocessed) and tokenized captions of rows with ``image`` and ``caption``, in their order."""
    data = PairInputs(rows, loaded)
    return data.collate([data[i] for i in range(len(data))])


class PairInputs(torch.utils.data.Dataset):
    """Rows with ``image`` (encoded bytes or a path) and ``caption`` as a map-style dataset: item ``i`` is row
    ``i``'s preprocessed image (the model's eval transform) and its caption; :meth:`collate` stacks the images
    and tokenizes the captions of a batch."""

    def __init__(self, rows: pa.Table | list[dict], loaded: LoadedModel):
        if isinstance(rows, pa.Table):
            self.images, self.captions = rows.column("image").to_pylist(), rows.column("caption").to_pylist()
        else:
            self.images, self.captions = [r["image"] for r in rows], [r["caption"] for r in rows]
        self.preprocess, self.tokenizer = image_preprocess(loaded.model), loaded.tokenizer

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.preprocess(open_rgb(self.images[i])), self.captions[i]

    def collate(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([im for im, _ in items]), self.tokenizer([c for _, c in items])


def input_batches(rows: pa.Table | list[dict], loaded: LoadedModel, micro_batch: int,
                  num_workers: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The rows' model inputs as ``(images, texts)`` batches of ``micro_batch`` rows in order (the last may be
    shorter): what :func:`~chips_core.scoring.featurize.forward_pre_batches` takes. With ``num_workers`` > 0 a
    ``torch.utils.data.DataLoader`` decodes and preprocesses in that many worker processes while the model
    runs, two batches ahead each, into pinned memory when the model is on a GPU; the batches are the same bits
    whatever the number of workers (each image is preprocessed alone). Memory: the batches in flight, not
    the rows' decoded images."""
    data = PairInputs(rows, loaded)
    num_workers = min(num_workers, -(-len(data) // micro_batch))  # no worker without a batch to decode
    return torch.utils.data.DataLoader(data, batch_size=micro_batch, shuffle=False, num_workers=num_workers,
                                       collate_fn=data.collate, pin_memory=str(loaded.device).startswith("cuda"),
                                       worker_init_fn=_forked_worker_init if num_workers else None)


def _forked_worker_init(worker_id: int) -> None:
    """A forked decode worker drops the exit hooks its parent's thread services registered (``threading``'s
    atexit list): their threads do not exist in the child, and Prefect's log and event services assert on exit
    there, so every worker of a featurize run inside a Prefect flow exited with status 1 and failed the shard."""
    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def featurize_workers(cfg: RunConfig, loaded: LoadedModel) -> int:
    """``featurize.num_workers``, or its default from the CPU count: on a GPU every core but the one feeding the
    device decodes (at most 16); on CPU the model's forward uses the cores, so none (decoding in the stage's own
    process) up to 4 cores, then a quarter of them."""
    if cfg.featurize.num_workers is not None:
        return cfg.featurize.num_workers
    cores = usable_cores()
    if str(loaded.device).startswith("cuda"):
        return max(1, min(cores - 1, 16))
    return 0 if cores <= 4 else cores // 4


def require_bank_model(loaded: LoadedModel, bank: ReferenceBank, run_id: str) -> None:
    """A featurize run's bank and features belong to the weights that made them: scoring or resuming them with
    other weights would mix two models' features (§8), so it is refused."""
    if loaded.checksum != bank.model_checksum:
        raise IncompatibleFeaturesError(
            f"featurize run {run_id!r} was made with model {bank.model_checksum[:12]}, not the loaded "
            f"{loaded.label} {loaded.checksum[:12]}: featurize the pool again with this model")


def endpoint_for(cfg: RunConfig, loaded: LoadedModel) -> EndpointModel:
    """The model's end-point view in the config's trunk precision (``featurize.precision``; auto: bf16 on CUDA)."""
    return EndpointModel(loaded.model, resolve_precision(cfg.featurize.precision, loaded.device))
