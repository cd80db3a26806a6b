"""docs/config.md is generated from the config dataclasses (chips_core/stages/config_reference.py): it must equal
what the code generates now, and every key must carry a comment (its meaning)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from chips_core.stages import config_reference as ref
from chips_core.stages.runconfig import RunConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_what_the_code_generates():
    assert DOC.read_text(encoding="utf-8") == ref.config_reference(), \
        "docs/config.md is stale: python -m chips_core.stages.config_reference > docs/config.md"


def test_every_key_has_a_meaning_and_every_config_key_is_listed():
    assert ref.undocumented() == []
    keys = {k.key.removesuffix("[]") for k in ref.config_keys()}
    assert {f.name for f in dataclasses.fields(RunConfig)} <= keys
    assert {"sketch.k", "pool[].images", "cpt.replay.fraction", "executor.address", "select.pursuit_round"} <= keys


@dataclasses.dataclass(frozen=True)
class _Inner:
    """An inner block."""
    size: int = 3  # how many
    planted: float = 0.5


@dataclasses.dataclass(frozen=True)
class _Planted:
    name: str  # what it is called
    # a comment block above a field
    # on two lines
    above: int = 1
    wrapped: int = 2  # a comment that goes on
    #                   on the next line
    inner: _Inner = _Inner()


def test_a_planted_undocumented_key_is_caught_and_comments_are_read_as_written():
    assert ref.undocumented(_Planted) == ["inner.planted"]
    keys = {k.key: k for k in ref.config_keys(_Planted)}
    assert keys["above"].meaning == "a comment block above a field on two lines"
    assert keys["wrapped"].meaning == "a comment that goes on on the next line"
    assert keys["inner"].meaning == "An inner block." and keys["inner"].section
    assert (keys["name"].default, keys["inner.size"].default, keys["inner.size"].type) == ("required", "`3`", "int")


@dataclasses.dataclass(frozen=True)
class _Grown(RunConfig):
    planted_key: int = 0


def test_a_key_added_to_the_run_config_is_named_and_makes_the_committed_reference_stale():
    assert ref.undocumented(_Grown) == ["planted_key"]  # the inherited keys keep their comments
    grown = ref.config_reference(_Grown)
    assert "| `planted_key` | int | `0` |  |" in grown and grown != DOC.read_text(encoding="utf-8")
