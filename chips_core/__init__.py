"""chips_core: the CHIPS data-selection library (no orchestration imports).

See ../shared/CHIPS_METHOD.md for the maths; each module cites the section it implements.
"""
from .config import BankConfig, CurvatureConfig, FeaturizeConfig, ScoreConfig, SketchConfig, config_hash
from .errors import (ChipsError, CheckpointNotFoundError, ConfigError, EndpointNotFoundError,
                     IncompatibleFeaturesError, NonFiniteEmbeddingError, UnsupportedModelError)
from .featurize import FeatureBatch, Featurizer, ReferenceBank, ScoringContext
from .identity import FeatureIdentity, content_pair_id, seeded_sample, seeded_unit
from .models import EndpointModel, LoadedModel, ModelSpec, load_model, state_dict_checksum
from .score import METHODS, Preconditioners, score_features, select_top
from .sketch import DenseSketch, IdentityProjection, RankOneSketch
from .target import CurvatureStats, TargetStats, curvature_sample, curvature_stats, target_stats

__version__ = "0.1.0"

__all__ = [
    "BankConfig", "CurvatureConfig", "FeaturizeConfig", "ScoreConfig", "SketchConfig", "config_hash",
    "ChipsError", "CheckpointNotFoundError", "ConfigError", "EndpointNotFoundError", "IncompatibleFeaturesError",
    "NonFiniteEmbeddingError", "UnsupportedModelError", "FeatureBatch", "Featurizer", "ReferenceBank",
    "ScoringContext", "FeatureIdentity", "content_pair_id", "seeded_sample", "seeded_unit", "EndpointModel",
    "LoadedModel", "ModelSpec", "load_model", "state_dict_checksum", "METHODS", "Preconditioners",
    "score_features", "select_top", "DenseSketch", "IdentityProjection", "RankOneSketch", "CurvatureStats",
    "TargetStats", "curvature_sample", "curvature_stats", "target_stats",
]
