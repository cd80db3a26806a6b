"""Small jobs every layer needs, each done in one place: atomic file writes, opening images and pair
tables, progress bars."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import os
import posixpath
import re
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from .errors import ConfigError


def atomic_write(path: str, data: bytes, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Write ``data`` under a hidden temporary name beside ``path`` (``.<name>.<uuid>.tmp``, which no
    reader globs), then move it into place: a reader sees the old file or the new one, never half."""
    fs = fs or fsspec.filesystem("file")
    path = str(path)
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
    return path


def atomic_put(local_path: str, path: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """:func:`atomic_write` for a local file too large to hold in memory: copied (``fs.put``) under the
    hidden temporary name, then moved into place."""
    fs = fs or fsspec.filesystem("file")
    folder, name = posixpath.split(str(path))
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    fs.put_file(str(local_path), tmp)
    fs.mv(tmp, str(path))
    return str(path)


def torch_bytes(obj) -> bytes:
    """``torch.save`` into memory (for :func:`atomic_write`)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def progress(items: Iterable | None = None, *, enabled: bool, desc: str, unit: str = "shard",
             total: int | None = None, initial: int = 0):
    """``items`` wrapped in a tqdm bar when ``enabled`` (the CLI), unchanged otherwise (tests, flows'
    logs). With ``items=None`` it is a manual bar (``.update(n)``), or None when not enabled."""
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit=unit, total=total, initial=initial)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def release_memory() -> None:
    """Hand memory the process has freed back to the operating system: a garbage collection, Arrow's pool, then
    glibc's ``malloc_trim`` (a no-op elsewhere). Called between stages, so that the next stage's peak does not stack on
    the heap a previous one left fragmented (featurize's model activations)."""
    gc.collect()
    pa.default_memory_pool().release_unused()  # Arrow's pool (mimalloc or jemalloc) keeps freed buffers for reuse
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextlib.contextmanager
def gc_frozen():
    """Within it, a full garbage collection (:func:`release_memory`'s, or one the interpreter starts) scans only the
    objects created inside: those alive on entry (the imported libraries, the loaded model: ~475k objects in a score
    run, 0.2 s a collection) are set aside by :func:`gc.freeze` and handed back on exit. Enter it just after a full
    collection (:func:`release_memory`): garbage cycles already dead on entry are set aside too, until the exit.
    Inside an outer freeze (this one nested, or the application's own) it does nothing: its exit would hand back the
    outer's objects too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def open_rgb(src: bytes | str) -> Image.Image:
    """A PIL RGB image from encoded bytes or a file path."""
    return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB")


def within_roots(path: str, roots: Sequence[str]) -> bool:
    """Whether ``path``, with every link resolved, lies inside one of ``roots`` (also resolved)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, r]) == r for r in (os.path.realpath(x) for x in roots))


def relative_to(path: str, base: str | Path) -> str:
    """``path`` as given when absolute or a URL, else joined to ``base`` (the folder of the table naming it)."""
    return path if os.path.isabs(path) or "://" in path else os.path.join(str(base), path)


def resolve_image_path(path: str, base: str | Path, roots: Sequence[str] | None, what: str) -> str:
    """The path rule every table of image paths follows (pool sources, manifests, eval suites): a relative path
    resolves against ``base`` (the table's folder); a local path must lie inside ``roots`` (default: ``base``);
    a URL is read as given. A path outside is a ConfigError naming ``what``, the path and the roots."""
    full = relative_to(path, base)
    if "://" in full:
        return full
    roots = list(roots or [str(base)])
    if not within_roots(full, roots):
        raise ConfigError(f"{what}: image path {path!r} resolves to {os.path.realpath(full)!r}, outside the allowed "
                          f"roots {[os.path.realpath(r) for r in roots]} (list its folder in allowed_roots)")
    return full


def read_pair_table(path: str | Path, what: str) -> pa.Table:
    """A Parquet, CSV or TSV table of pairs (a suite, a manifest); errors name ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {str(path)!r}")
    if path.suffix == ".parquet":
        return pq.read_table(path)
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ","))


# -- secrets: never at rest -----------------------------------------------------------------------------------
_SECRETS: dict[str, str] = {}  # value -> what to write instead (e.g. "${ENV:NAME}")
_URI_PASSWORD = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]*:)(?P<pw>[^\s@/'\"]+)(?=@)", re.I)
_QUERY_SECRET = re.compile(r"(?P<pre>[?&;](?P<name>[^=&;\s'\"]+)=)(?P<val>[^&;\s'\"]+)")
_CREDENTIAL_WORDS = {"password", "passwd", "pwd", "secret", "token", "key", "credential", "credentials", "auth",
                     "apikey", "signature", "sig", "sas"}


def register_secret(value: str, replacement: str = "<secret>") -> None:
    """Remember a secret value (resolved from the environment, or named in a config's ``secrets:``), so that
    :func:`scrub` replaces it wherever it would be written: run rows, published tables, logs."""
    if isinstance(value, str) and len(value) >= 4:
        _SECRETS[value] = replacement


def is_credential_name(name: str) -> bool:
    """A mapping key named like a credential: one of its words (split at ``_``, ``-``, ``.`` and camelCase) is
    password, secret, token, key, auth, ... (``tokenizer`` or ``keys_file`` are not)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    return any(w in _CREDENTIAL_WORDS for w in re.split(r"[_\-.\s]+", words))


def scrub(text: str) -> str:
    """``text`` without the secrets it may carry: the password of any ``scheme://user:password@host`` URI, the value
    of any URL query parameter named like a credential, and every registered secret value."""
    if not isinstance(text, str) or not text:
        return text
    for value, replacement in sorted(_SECRETS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(value, replacement)
    text = _URI_PASSWORD.sub(lambda m: m.group("pre") + "<redacted>", text)
    return _QUERY_SECRET.sub(lambda m: m.group("pre") + ("<redacted>" if is_credential_name(m.group("name"))
                                                          else m.group("val")), text)
