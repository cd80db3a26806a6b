"""chips_core: the CHIPS data-selection library (no orchestration imports).

Layers (ARCHITECTURE.md): ``scoring`` (the maths) <- ``platform`` (warehouse, readers, validation,
SQL, provenance) and ``train`` (CPT, evaluation) <- ``stages`` (one function per stage over the
warehouse). The names below are the scoring API; see ../shared/CHIPS_METHOD.md for the maths.
"""
from importlib import import_module

from .errors import (CheckpointNotFoundError, ChipsError, ConfigError, EndpointNotFoundError,
                     IncompatibleFeaturesError, NonFiniteEmbeddingError, UnsupportedModelError)

# the scoring API, imported on first use (PEP 562): reading the warehouse (`chips sql`, `runs`, `report`) then
# never pays for torch
_LAZY = {
    "scoring.endpoint": ("EndpointModel", "LoadedModel", "ModelSpec", "load_model", "state_dict_checksum"),
    "scoring.featurize": ("BankConfig", "FeatureBatch", "FeaturizeConfig", "Featurizer", "ReferenceBank",
                          "ScoringContext"),
    "scoring.identity": ("FeatureIdentity", "content_pair_id", "seeded_sample", "seeded_unit"),
    "scoring.score": ("METHODS", "Preconditioners", "ScoreConfig", "score_features", "select_top"),
    "scoring.sketch": ("DenseSketch", "IdentityProjection", "RankOneSketch", "SketchConfig"),
    "scoring.target": ("CurvatureConfig", "CurvatureStats", "TargetStats", "curvature_sample", "curvature_stats",
                       "target_stats"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "BankConfig", "CurvatureConfig", "FeaturizeConfig", "ScoreConfig", "SketchConfig",
    "ChipsError", "CheckpointNotFoundError", "ConfigError", "EndpointNotFoundError", "IncompatibleFeaturesError",
    "NonFiniteEmbeddingError", "UnsupportedModelError", "FeatureBatch", "Featurizer", "ReferenceBank",
    "ScoringContext", "FeatureIdentity", "content_pair_id", "seeded_sample", "seeded_unit", "EndpointModel",
    "LoadedModel", "ModelSpec", "load_model", "state_dict_checksum", "METHODS", "Preconditioners",
    "score_features", "select_top", "DenseSketch", "IdentityProjection", "RankOneSketch", "CurvatureStats",
    "TargetStats", "curvature_sample", "curvature_stats", "target_stats",
]
