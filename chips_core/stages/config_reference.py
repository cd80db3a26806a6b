"""docs/config.md, generated: every key of the run config with its type, default and meaning.

The meaning of a key is the comment written beside its field in the config dataclasses (on the field's line, or the
comment lines just above it), so the reference and the code cannot drift: ``tests/stages/test_config_reference.py``
fails when docs/config.md differs from :func:`config_reference` or when a key has no comment (:func:`undocumented`).

    python -m chips_core.stages.config_reference > docs/config.md
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Iterator

from .runconfig import RunConfig


@dataclasses.dataclass(frozen=True)
class Key:
    key: str  # dotted path as written in YAML; ``[]`` marks a list of mappings
    type: str
    default: str
    meaning: str
    section: bool  # a mapping whose keys follow


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the class's source: the comment lines directly above a field (at its indentation),
    the comment at the end of its last line and the comment-only lines that continue it (indented further, or
    written ``#`` then two or more spaces, aligned under it)."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip(), t.string.startswith("#  "))
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text, line = [], node.lineno - 1
        while line in comments and comments[line][0] == node.col_offset and not comments[line][2]:
            text.insert(0, comments[line][1])
            line -= 1
        line = node.end_lineno
        if line in comments and comments[line][0] > node.col_offset:
            text.append(comments[line][1])
            while line + 1 in comments and not lines[line].strip().split("#")[0] and (
                    comments[line + 1][0] > node.col_offset or comments[line + 1][2]):  # a comment-only line
                # indented further, or its text aligned under the comment above (``#   ...``): continued
                line += 1
                text.append(comments[line][1])
        out[node.target.id] = " ".join(text)
    return out


def _docstring(cls) -> str:
    """The first paragraph of the class's own docstring ("" for a dataclass without one: its generated signature)."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split("\n\n")[0].split())


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "list [" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, tuple):
        value = list(value)
    return "`null`" if value is None else f"`{value!r}`".replace("|", "\\|")


def config_keys(cls=RunConfig, prefix: str = "") -> Iterator[Key]:
    """Every key under ``cls`` (depth first, in field order)."""
    hints = typing.get_type_hints(cls)
    comments = {}
    for base in reversed(cls.__mro__):  # a field's comment is in the class that declares it
        if dataclasses.is_dataclass(base):
            comments.update(field_comments(base))
    for f in dataclasses.fields(cls):
        tp, args = hints[f.name], typing.get_args(hints[f.name])
        inner, key = tp, prefix + f.name
        if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            inner, key = args[0], key + "[]"
        if dataclasses.is_dataclass(inner):
            doc = comments.get(f.name) or _docstring(inner)
            yield Key(key, "list of mappings" if key.endswith("[]") else "mapping", _default(f), doc, True)
            yield from config_keys(inner, key + ".")
        else:
            yield Key(key, _type_name(tp), _default(f), comments.get(f.name, ""), False)


def undocumented(cls=RunConfig) -> list[str]:
    """The keys with no comment beside their field (and, for a section, no class docstring either)."""
    return [k.key for k in config_keys(cls) if not k.meaning]


def config_reference(cls=RunConfig) -> str:
    lines = ["# Run config reference", "",
             "Every key of the run config (`chips run CONFIG`, `chips refresh`, `chips check`, ...), generated from the "
             "config dataclasses by `python -m chips_core.stages.config_reference > docs/config.md`; the meaning is the "
             "comment beside each field in the code. A test fails when this file and the code differ. Keys under a "
             "mapping are written nested in YAML (`sketch: {k: 512}`); `[]` marks a list of mappings "
             "(`pool: [{name: ..., kind: ..., paths: [...]}]`). Unknown keys are an error naming the key.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for k in config_keys(cls):
        name = f"**`{k.key}`**" if k.section else f"`{k.key}`"
        meaning = " ".join(k.meaning.split()).replace("|", "\\|")
        lines.append(f"| {name} | {k.type} | {k.default} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
