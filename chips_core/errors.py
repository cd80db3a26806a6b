"""Named exceptions. Every message names the offending value (house style 7)."""
from __future__ import annotations


class ChipsError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ChipsError, ValueError):
    """A configuration value is out of its allowed range."""


class CheckpointNotFoundError(ChipsError, FileNotFoundError):
    """A checkpoint path given for a model does not exist."""


class EndpointNotFoundError(ChipsError):
    """The model has no end-point projection this package knows how to read (§1)."""


class UnsupportedModelError(ConfigError):
    """The model is an open_clip model, but not one CHIPS' InfoNCE scoring applies to."""


class NonFiniteEmbeddingError(ChipsError, ValueError):
    """A pair produced a NaN/inf feature, or a zero-norm projection that cannot be normalised."""


class IncompatibleFeaturesError(ChipsError, ValueError):
    """Features were produced under another model, bank, sketch seed or k than the scorer's (§8)."""



def check(cond: bool, owner: str, field: str, value, rule: str) -> None:
    """The one way a configuration value is checked: ``ConfigError("Owner.field=value is invalid: rule")``."""
    if not cond:
        raise ConfigError(f"{owner}.{field}={value!r} is invalid: {rule}")
