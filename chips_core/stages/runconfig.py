"""One YAML file per pipeline, validated into typed config objects; errors name the key and value.

Example (``configs/example.yaml`` layout)::

    warehouse: /data/chips-wh
    pool:
      - {name: pmc, kind: webdataset, paths: [/data/pmc/shard-00000.tar]}
    target:
      - {name: radiology-eval, kind: csv, paths: [/data/eval/eval.csv]}
    model: {name: ViT-B-32, checkpoint: /models/clip.pt}
    sketch: {k: 512, seed: 0}
    curvature: {alpha: 0.7}
    budgets: [0.1, 0.3]
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ChipsError, ConfigError, check
from ..platform.readers import SourceSpec
from ..platform.selection import MEMORY_LIMIT
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import ModelSpec
from ..scoring.featurize import BankConfig, FeaturizeConfig
from ..scoring.premise import PremiseConfig
from ..scoring.score import METHODS, ScoreConfig
from ..scoring.select import SET_METHODS, SelectConfig
from ..scoring.sketch import SketchConfig
from ..scoring.target import CurvatureConfig
from ..train.cpt import CPTConfig
from ..train.evaluate import SuiteSpec
from ..util import register_secret


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "chips-out"  # where subset manifests are written
    # parquet manifest, open_clip_train CSV, and "webdataset": tar shards of {png|jpg, txt, json} per subset
    # (<dir>/<run>/webdataset/<method>_at_<budget>/000000.tar, ...), what open_clip reads with --dataset-type webdataset
    formats: tuple[str, ...] = ("parquet", "csv")
    shard_max_bytes: int = 1 << 30  # a WebDataset tar shard is closed once it holds this many bytes of members
    # also materialise the whole scored pool as subset `<score run>:full@1` (CPT on everything: the comparison
    # every selection needs); false for a pool so large that its manifest would copy every image
    full: bool = True

    def __post_init__(self):
        bad = [f for f in self.formats if f not in ("parquet", "csv", "webdataset")]
        check(not bad, "OutputConfig", "formats", bad, "not in ('parquet', 'csv', 'webdataset')")
        check(self.shard_max_bytes >= 1, "OutputConfig", "shard_max_bytes", self.shard_max_bytes, "must be >= 1")


@dataclass(frozen=True)
class PublishConfig:
    delta: bool = False  # after materialize, append the run's scores and subsets to <warehouse>/delta/
    iceberg: bool = False  # ... and to the Iceberg tables chips.scores / chips.subsets (pyiceberg, SQL catalog)
    # the Iceberg catalog (a SQLAlchemy URL); None: a SQLite file under <warehouse>/iceberg/ (local warehouses)
    iceberg_catalog_uri: str | None = None


@dataclass(frozen=True)
class RefreshConfig:
    # a refresh (`chips refresh`) reuses the last featurize run's curvature statistics until the pool has grown
    # by more than this fraction of its size then; beyond it they are recomputed over the current pool's sample
    recompute_curvature_after: float = 0.2

    def __post_init__(self):
        check(self.recompute_curvature_after >= 0.0, "RefreshConfig", "recompute_curvature_after",
              self.recompute_curvature_after, "must be >= 0")


@dataclass(frozen=True)
class WarmupConfig:
    """``chips warmup``: short CPT rounds on in-domain pool pairs for a model that fails the premise check, the check
    again after each round (stages/warmup.py). The defaults were not chosen on a benchmark: the check after each
    round is what decides, and ``max_rounds`` bounds the cost."""
    size: int = 2048  # pool pairs the warm-up trains on: the first in-domain ones of the seeded candidates
    candidates: int = 8192  # pool pairs (a seeded sample) the relevance gate judges (0: the whole pool)
    epochs_per_round: int = 2  # CPT epochs (cpt:'s other settings, replay included) between two premise checks
    max_rounds: int = 4  # rounds before the warm-up stops without passing
    seed: int = 0  # seed of the candidate sample and of their order

    def __post_init__(self):
        check(isinstance(self.size, int) and self.size >= 2, "WarmupConfig", "size", self.size, "an int >= 2")
        check(isinstance(self.candidates, int) and (self.candidates == 0 or self.candidates >= self.size),
              "WarmupConfig", "candidates", self.candidates, f"0 (the whole pool) or >= size ({self.size})")
        check(isinstance(self.epochs_per_round, int) and self.epochs_per_round >= 1, "WarmupConfig",
              "epochs_per_round", self.epochs_per_round, "an int >= 1")
        check(isinstance(self.max_rounds, int) and self.max_rounds >= 1, "WarmupConfig", "max_rounds",
              self.max_rounds, "an int >= 1")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where ingest's and featurize's shards and score's parts run (``executor:``; ``--executor`` on run, refresh
    and rescore). ``local``: in the driving process (today's default). ``dask``: as Dask tasks, on the scheduler at
    ``address`` (``tcp://host:8786``) or, without one, on a LocalCluster of ``n_workers`` processes with
    ``threads_per_worker`` threads that the run starts and stops. ``resources`` (e.g. ``{GPU: 1}``) are what each shard task holds on its worker (workers
    declare theirs: ``dask worker ... --resources GPU=1``). Where the work runs does not change what it makes: the
    executor is left out of the config hash (a run killed on Dask resumes locally, and the reverse)."""
    kind: str = "local"  # local (threads in the driving process) or dask
    address: str | None = None  # dask: an existing scheduler, tcp://host:8786 (none: a LocalCluster for the run)
    n_workers: int = 2  # dask without an address: the LocalCluster's worker processes
    threads_per_worker: int = 1  # ... and threads in each
    resources: dict | None = field(default=None, hash=False)  # what each shard task holds on its worker, e.g. {GPU: 1}

    def __post_init__(self):
        check(self.kind in ("local", "dask"), "ExecutorConfig", "kind", self.kind, "must be 'local' or 'dask'")
        check(self.address is None or re.match(r"^(tcp|tls|inproc|ucx)://", self.address) is not None,
              "ExecutorConfig", "address", self.address, "must be a scheduler URL such as tcp://host:8786")
        check(self.address is None or self.kind == "dask", "ExecutorConfig", "address", self.address,
              "needs kind: dask")
        check(self.n_workers >= 1, "ExecutorConfig", "n_workers", self.n_workers, "must be >= 1")
        check(self.threads_per_worker >= 1, "ExecutorConfig", "threads_per_worker", self.threads_per_worker,
              "must be >= 1")
        bad = {k: v for k, v in (self.resources or {}).items() if not isinstance(v, (int, float)) or v <= 0}
        check(not bad, "ExecutorConfig", "resources", bad, "each amount must be a positive number")

    @classmethod
    def parse(cls, value: str) -> "ExecutorConfig":
        """The ``--executor`` flag: ``local``, ``dask`` (a LocalCluster) or a scheduler address."""
        if value in ("local", "dask"):
            return cls(kind=value)
        if "://" in value:
            return cls(kind="dask", address=value)
        raise ConfigError(f"--executor {value!r}: use local, dask (a local cluster) or a scheduler address "
                          "such as tcp://host:8786")


@dataclass(frozen=True)
class RunConfig:
    warehouse: str  # local path or fsspec URL
    pool: tuple[SourceSpec, ...]  # candidate pairs to score
    target: tuple[SourceSpec, ...]  # the target-domain evaluation set
    model: ModelSpec
    sketch: SketchConfig = SketchConfig()  # the JL sketch of the end-point gradients (CHIPS_METHOD.md §4)
    bank: BankConfig = BankConfig()  # the reference bank every pair's loss is computed against (§2)
    curvature: CurvatureConfig = CurvatureConfig()  # the curvature matrix M of the Newton alignment (§5)
    score: ScoreConfig = ScoreConfig()  # the per-pair scores (chips, chips_plus, ...)
    select: SelectConfig = SelectConfig()  # the set-aware selectors' parameters (methods chips_pursuit, ...)
    featurize: FeaturizeConfig = FeaturizeConfig()  # how the model runs over the pool (batching, precision, decoding)
    check: PremiseConfig = PremiseConfig()  # premise checks (`chips check`, and every score run)
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)  # fractions of the scored pool materialised per method
    # selectors materialised at each budget: the per-pair scores (chips, chips_plus, random, ...) and the set-aware
    # selectors (chips_pursuit, chips_infomax, chips_cluster)
    methods: tuple[str, ...] = METHODS
    shard_size: int = 2048  # pairs per featurize/score shard
    score_threads: int = 0  # threads scoring stored feature parts at once (0: one per CPU core)
    device: str = "cpu"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N"; resolved when loaded
    outputs: OutputConfig = OutputConfig()  # the subsets' manifests (materialize)
    publish: PublishConfig = PublishConfig()  # lakehouse tables written by the pipeline
    refresh: RefreshConfig = RefreshConfig()  # what a refresh reuses (`chips refresh`)
    # opt-out / takedown lists (CSV or Parquet with pair_id, source_key, url or sha256 columns): matched after
    # ingest (stages/takedown.py); every listed pair is left out of every later subset and manifest
    takedowns: tuple[str, ...] = ()
    cpt: CPTConfig = CPTConfig()  # continual pre-training on a materialised subset (`chips cpt`)
    eval_suites: tuple[SuiteSpec, ...] = ()  # named evaluation suites (`chips eval`)
    # a source that loses more than this share of its rows to quarantine stops the run before featurize
    # (all of them always does): mass quarantine is a configuration problem (e.g. allowed_roots), not noise
    max_quarantine_share: float = 0.5
    storage_options: dict | None = field(default=None, hash=False)  # fsspec options for the warehouse URL
    # DuckDB's working memory when score ranks and materialize selects (spills to disk beyond it)
    duckdb_memory_limit: str = MEMORY_LIMIT
    # dotted paths of config values that are secret (e.g. publish.iceberg_catalog_uri, pool.0.paths): recorded as
    # <secret>. Better still, write a secret as ${ENV:NAME}: resolved from the environment when the config loads,
    # never stored. URI passwords and keys named like credentials are redacted without being listed.
    secrets: tuple[str, ...] = ()
    warmup: WarmupConfig = WarmupConfig()  # `chips warmup`: CPT rounds on in-domain pairs until the check passes
    executor: ExecutorConfig = ExecutorConfig()  # where ingest's, featurize's and score's shards run (local, or Dask)
    # other sources, neither pool nor target: a general-domain replay stream (cpt.replay.source), warm-up pairs,
    # pools for later runs. `chips ingest CONFIG --source NAME` ingests and validates them; `chips run` does not
    sources: tuple[SourceSpec, ...] = ()

    def source(self, name: str) -> SourceSpec:
        """The pool, target or other source called ``name`` (a ConfigError listing the names when there is none)."""
        for spec in (*self.pool, *self.target, *self.sources):
            if spec.name == name:
                return spec
        raise ConfigError(f"no source {name!r} in the config (its sources: "
                          f"{', '.join(s.name for s in (*self.pool, *self.target, *self.sources))})")

    def __post_init__(self):
        bad = [b for b in self.budgets if not 0 < b <= 1]
        check(not bad, "RunConfig", "budgets", bad, "each must lie in (0, 1]")
        bad = [m for m in self.methods if m not in METHODS + SET_METHODS]
        check(not bad, "RunConfig", "methods", bad, f"not in {METHODS + SET_METHODS}")
        names = [s.name for s in (*self.pool, *self.target, *self.sources)]
        check(len(set(names)) == len(names), "RunConfig", "pool/target/sources", names, "source names must be distinct")
        suites = [s.name for s in self.eval_suites]
        check(len(set(suites)) == len(suites), "RunConfig", "eval_suites", suites, "names must be distinct")
        check(self.shard_size >= 1, "RunConfig", "shard_size", self.shard_size, "must be >= 1")
        check(isinstance(self.score_threads, int) and self.score_threads >= 0, "RunConfig", "score_threads",
              self.score_threads, "an int >= 0 (0: one per CPU core)")
        check(0.0 <= self.max_quarantine_share <= 1.0, "RunConfig", "max_quarantine_share", self.max_quarantine_share,
              "must lie in [0, 1]")
        check(re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", str(self.duckdb_memory_limit)) is not None, "RunConfig",
              "duckdb_memory_limit", self.duckdb_memory_limit, "a size such as 256MB or 2GiB")
        object.__setattr__(self, "device", resolve_device(self.device))  # provenance records the device used

    def open_warehouse(self, create: bool = True) -> Warehouse:
        """The config's warehouse, able to read images its sources hold by reference (with their storage options)."""
        return Warehouse(self.warehouse, self.storage_options, create=create,
                         source_options={s.name: s.storage_options for s in (*self.pool, *self.target, *self.sources)
                                         if s.storage_options})


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when CUDA is available, else ``"cpu"``; a CUDA device that this machine does not
    have is a ConfigError naming it (checked before any model is loaded)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        check(index == "" or index.isdigit(), "RunConfig", "device", device, "use cpu, auto, cuda or cuda:N")
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(available > (int(index) if index else 0), "RunConfig", "device", device,
              f"this machine has {available} CUDA device(s); use device: auto or cpu")
        return device
    check(device in ("cpu", "mps"), "RunConfig", "device", device, "use cpu, auto, cuda or cuda:N")
    return device


def load_run_config(source: str | Path | dict) -> RunConfig:
    """Parse a YAML file (or a dict) into a :class:`RunConfig`."""
    if isinstance(source, dict):
        data, where = source, "run config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"run config not found: {str(path)!r}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"run config {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"run config {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        where = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return _build(RunConfig, resolve_env(data, where), where, "")


def with_executor(source: str | Path | dict, executor: str) -> dict:
    """The config ``source`` (a YAML path or a dict) as a dict whose ``executor:`` is the one ``executor`` names
    (``local``, ``dask`` or a scheduler address, as ``--executor``); the file's own errors first, naming it."""
    chosen = ExecutorConfig.parse(executor)
    load_run_config(source)
    data = dict(source) if isinstance(source, dict) else yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    return {**data, "executor": {**(data.get("executor") or {}), "kind": chosen.kind, "address": chosen.address}}


_ENV_REF = re.compile(r"\$\{ENV:([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_env(value, where: str = "run config", key: str = ""):
    """Every ``${ENV:NAME}`` in the config's strings replaced by that environment variable (a ConfigError naming it
    when unset). Each resolved value is registered as a secret: wherever it would be written (runs rows, published
    tables, logs) ``${ENV:NAME}`` is written instead."""
    if isinstance(value, dict):
        return {k: resolve_env(v, where, f"{key}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, where, f"{key}{i}.") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${ENV:" not in value:
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise ConfigError(f"{where}: {key.rstrip('.')} refers to ${{ENV:{name}}}, but the environment variable "
                              f"{name} is not set")
        register_secret(os.environ[name], f"${{ENV:{name}}}")
        return os.environ[name]

    return _ENV_REF.sub(sub, value)


def _build(cls, data, where: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'value'}={data!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix + unknown[0]!r} (allowed: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key {prefix + missing[0]!r}")
    kwargs = {k: _coerce(hints[k], v, where, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ChipsError as e:
        raise ConfigError(f"{where}: {prefix}{e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from e


def _coerce(tp, value, where: str, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        exact = [a for a in inner if isinstance(a, type) and not dataclasses.is_dataclass(a) and isinstance(value, a)]
        return _coerce((exact or inner)[0], value, where, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}={value!r} must be a list")
        return tuple(_coerce(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key}={value!r} must be {tp.__name__}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}={value!r} must be a mapping")
    return value
