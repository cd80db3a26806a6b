"""Images referenced as tar members (``tar://<member>::<shard>``) are read by one pass over each shard's headers,
then by offset: not by indexing the shard again for every member (which cost 0.5 s an image at 10k members).
Compressed shards and upper-case extensions still read; a missing member is the named error."""
from __future__ import annotations

import hashlib
import io
import tarfile

import pyarrow as pa
import pytest

from chips_core.platform import images as images_module
from chips_core.platform.images import ImageSources, SourceImageError


def _shard(path, names, gz=False):
    data = {n: hashlib.sha256(n.encode()).digest() * (1 + i % 3) for i, n in enumerate(names)}
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for n, b in data.items():
            info = tarfile.TarInfo(n)
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    return data


def _table(shard, data, uri_names):
    ids = [f"p{i}" for i in range(len(uri_names))]
    return pa.table({"pair_id": ids, "source": ["pool"] * len(ids), "image": pa.nulls(len(ids), pa.binary()),
                     "image_uri": [f"tar://{u}::{shard}" for u in uri_names],
                     "image_sha256": [hashlib.sha256(data[n]).hexdigest() for n in data]})


@pytest.mark.parametrize("gz", [False, True])
def test_tar_members_read_back_with_one_index_per_shard(tmp_path, monkeypatch, gz):
    names = [f"{i:05d}.png" for i in range(40)] + ["dir/UPPER.PNG"]
    shard = str(tmp_path / ("s.tar.gz" if gz else "s.tar"))
    data = _shard(shard, names, gz)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(images_module.tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    uri_names = names[:-1] + ["dir/UPPER.png"]  # ingest writes the extension lower-cased
    out = ImageSources().fill(_table(shard, data, uri_names))
    assert out.column("image").to_pylist() == list(data.values())
    if not gz:
        assert len(opened) == 1  # one pass over the headers for 41 members
    with pytest.raises(SourceImageError, match=r"pair p0: image 'tar://nope.png.*is missing"):
        ImageSources().fill(_table(shard, {"x": data[names[0]]}, ["nope.png"]))
