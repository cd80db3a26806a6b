"""chips_core: the CHIPS data-selection library (no orchestration imports).

Layers (ARCHITECTURE.md): ``scoring`` (the maths) <- ``platform`` (warehouse, readers, validation,
SQL, provenance) and ``train`` (CPT, evaluation) <- ``stages`` (one function per stage over the
warehouse). The names below are the scoring API; see ../shared/CHIPS_METHOD.md for the maths.
"""
from .errors import (CheckpointNotFoundError, ChipsError, ConfigError, EndpointNotFoundError,
                     IncompatibleFeaturesError, NonFiniteEmbeddingError, UnsupportedModelError)
from .scoring.endpoint import EndpointModel, LoadedModel, ModelSpec, load_model, state_dict_checksum
from .scoring.featurize import BankConfig, FeatureBatch, FeaturizeConfig, Featurizer, ReferenceBank, ScoringContext
from .scoring.identity import FeatureIdentity, content_pair_id, seeded_sample, seeded_unit
from .scoring.score import METHODS, Preconditioners, ScoreConfig, score_features, select_top
from .scoring.sketch import DenseSketch, IdentityProjection, RankOneSketch, SketchConfig
from .scoring.target import (CurvatureConfig, CurvatureStats, TargetStats, curvature_sample, curvature_stats,
                             target_stats)

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
