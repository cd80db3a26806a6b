"""What the stages share: how shard work is mapped, the model fields of a ``runs`` row, and reading
a set of sources' pairs as model inputs."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..errors import IncompatibleFeaturesError
from ..platform.readers import SourceSpec
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel, image_preprocess
from ..scoring.featurize import ReferenceBank
from ..util import open_rgb
from .runconfig import RunConfig

T = TypeVar("T")
ShardFn = Callable[[int, Sequence[str]], T]
MapShards = Callable[[ShardFn, Sequence[Sequence[str]]], Iterable[T]]


def local_map(fn: ShardFn, shards: Sequence[Sequence[str]]) -> Iterable[T]:
    """The default executor: shard ``n`` is ``fn(n, shards[n])``, one after another in this process.
    An orchestrator passes its own (the Prefect flows pass a mapped task), yielding results in order."""
    return (fn(n, shard) for n, shard in enumerate(shards))


def model_fields(cfg: RunConfig, loaded: LoadedModel) -> dict:
    """The ``runs`` columns that say which model and sketch a stage ran with."""
    return {"model_name": loaded.label, "model_checksum": loaded.checksum, "sketch_seed": cfg.sketch.seed,
            "sketch_k": cfg.sketch.k}


def source_pair_ids(wh: Warehouse, sources: Sequence[SourceSpec | str]) -> list[str]:
    """Distinct pair ids recorded under any of the sources (specs or names), sorted (the canonical order)."""
    names = [s if isinstance(s, str) else s.name for s in sources]
    t = wh.read("pair_sources", columns=["pair_id", "source"])
    t = t.filter(pc.is_in(t.column("source"), pa.array(names, pa.string())))
    return sorted(set(t.column("pair_id").to_pylist()))


REASON_HINTS = {"path_outside_root": "list the images' folder in the source's allowed_roots",
                "missing_image_file": "check the image paths (relative paths resolve against the CSV's folder)"}


def require_pairs(wh: Warehouse, sources: Sequence[SourceSpec], what: str, minimum: int = 2) -> list[str]:
    """The sources' pair ids, or one ValueError naming the sources and, when ingest quarantined their rows,
    the top reasons with counts and what to do — before any model time is spent on a run that cannot score."""
    ids = source_pair_ids(wh, sources)
    if len(ids) >= minimum:
        return ids
    names = [s.name for s in sources]
    q = wh.read("quarantine", columns=["source", "reason", "detail"])
    q = q.filter(pc.is_in(q.column("source"), pa.array(names, pa.string())))
    counts: dict[str, int] = {}
    for row in q.to_pylist():  # a read_error's detail starts with the specific cause ("path_outside_root: ...")
        cause = (row["detail"] or "").split(":", 1)[0]
        reason = cause if row["reason"] == "read_error" and cause.isidentifier() else row["reason"]
        counts[reason] = counts.get(reason, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    why = ("; quarantined at ingest: " + ", ".join(f"{r} × {n}" for r, n in top)) if top else ""
    hints = [REASON_HINTS[r] for r, _ in top if r in REASON_HINTS]
    raise ValueError(f"{what} sources {names} hold {len(ids)} pairs; need at least {minimum}{why}"
                     + (f" (fix: {hints[0]})" if hints else ""))


def load_pairs(wh: Warehouse, ids: Sequence[str], loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (preprocessed) and tokenized captions for ``ids``, in the order of ``ids``."""
    rows = wh.read_pairs(ids)
    prep = image_preprocess(loaded.model)
    images = torch.stack([prep(open_rgb(r["image"])) for r in rows])
    return images, loaded.tokenizer([r["caption"] for r in rows])


def require_bank_model(loaded: LoadedModel, bank: ReferenceBank, run_id: str) -> None:
    """A featurize run's bank and features belong to the weights that made them: scoring or resuming them with
    other weights would mix two models' features (§8), so it is refused."""
    if loaded.checksum != bank.model_checksum:
        raise IncompatibleFeaturesError(
            f"featurize run {run_id!r} was made with model {bank.model_checksum[:12]}, not the loaded "
            f"{loaded.label} {loaded.checksum[:12]}: featurize the pool again with this model")
