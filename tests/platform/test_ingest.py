"""Readers, Great Expectations row/batch rules, quarantine and the warehouse (issue: data platform)."""
import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chips_core.platform.readers import SchemaChangeError, read_csv, read_image_folder, read_parquet, read_webdataset
from chips_core.platform.validate import BatchValidationError, check_batch
from chips_core.platform.warehouse import Warehouse
from chips_core.stages.ingest import ingest_shard


def png(seed: int, size=(16, 16), mode="RGB", fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_tar(path, samples, truncate_at: int | None = None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:truncate_at] if truncate_at else data)


def reasons(counts_and_rows):
    return sorted(r["reason"] for r in counts_and_rows)


@pytest.fixture
def wh(tmp_path):
    return Warehouse(str(tmp_path / "wh"))


def test_webdataset_good_corrupt_and_missing_members(tmp_path, wh):
    shard = tmp_path / "shard-000.tar"
    make_tar(shard, [("a.png", png(1)), ("a.txt", b"a red square"),
                     ("b.jpg", b"\xff\xd8 not really a jpeg"), ("b.txt", b"a broken image"),
                     ("c.png", png(3)),  # no caption
                     ("d.png", png(4)), ("d.json", b'{"caption": "a json caption"}')])
    counts = ingest_shard(read_webdataset(str(shard), "wds"), wh, "run1", "shard-000")
    assert counts == {"read": 4, "kept": 2, "quarantined": 2, "unchanged": 0, "duplicates": 0}
    q = wh.read("quarantine").to_pylist()
    assert reasons(q) == ["image_undecodable", "read_error"]
    assert any("missing_caption" in r["detail"] for r in q)
    pairs = wh.read("pairs").to_pylist()
    assert sorted(p["caption"] for p in pairs) == ["a json caption", "a red square"]
    assert all(p["image_uri"].startswith("tar://") for p in pairs)


def test_truncated_tar_is_quarantined_not_a_crash(tmp_path, wh):
    shard = tmp_path / "cut.tar"
    make_tar(shard, [("a.png", png(1)), ("a.txt", b"first"), ("b.png", png(2, size=(64, 64))), ("b.txt", b"second")],
             truncate_at=1536 + 512)
    counts = ingest_shard(read_webdataset(str(shard), "wds"), wh, "run1", "cut")
    q = wh.read("quarantine").to_pylist()
    assert counts["read"] == counts["kept"] + counts["quarantined"]
    assert "truncated_shard" in " ".join(r["detail"] for r in q)


def test_csv_bad_rows_each_quarantined_with_reason(tmp_path, wh):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png(1))
    (root / "ok2.png").write_bytes(png(2))
    (root / "cmyk.jpg").write_bytes(png(5, mode="CMYK", fmt="JPEG"))
    (root / "tiny.png").write_bytes(png(6, size=(4, 4)))
    (tmp_path / "secret.png").write_bytes(png(7))
    rows = [("images/ok.png", "a good caption"), ("images/missing.png", "no file"),
            ("images/ok2.png", ""), ("images/ok2.png", "   \t "), ("images/ok2.png", "x" * 100_000),
            ("../secret.png", "escapes the root"), (str(tmp_path / "secret.png"), "absolute path outside"),
            ("images/cmyk.jpg", "cmyk image"), ("images/tiny.png", "too small"),
            ("images/ok.png", "a good caption")]  # duplicate within the source
    csv_path = root.parent / "list.csv"
    with open(csv_path, "wb") as f:
        f.write(b"filepath,title\n")
        for p, c in rows:
            f.write(f"{p},{c}\n".encode())
        f.write(b"images/ok2.png,caf\xe9 latin-1\n")  # not UTF-8
    counts = ingest_shard(read_csv(str(csv_path), "csv", allowed_roots=[str(root)]), wh, "run1", "csv")
    assert counts == {"read": 11, "kept": 1, "quarantined": 10, "unchanged": 0, "duplicates": 1}
    q = {r["source_key"].split("#")[1]: (r["reason"], r["detail"]) for r in wh.read("quarantine").to_pylist()}
    assert q["line=3"][0] == "read_error" and "missing_image_file" in q["line=3"][1]
    assert q["line=4"][0] == "caption_empty" and q["line=5"][0] == "caption_empty"
    assert q["line=6"] == ("caption_too_long", "caption has 100000 characters")
    assert q["line=7"][0] == "read_error" and "path_outside_root" in q["line=7"][1]
    assert q["line=8"][0] == "read_error" and "path_outside_root" in q["line=8"][1]
    assert q["line=9"] == ("image_mode_unsupported", "image mode 'CMYK'")
    assert q["line=10"][0] == "image_too_small"
    assert q["line=11"][0] == "duplicate"
    assert q["line=12"][0] == "caption_not_utf8"
    # re-ingesting the same file writes no quarantine row twice: every row is unchanged, counts reconcile
    again = ingest_shard(read_csv(str(csv_path), "csv", allowed_roots=[str(root)]), wh, "run2", "csv")
    assert again == {"read": 11, "kept": 0, "quarantined": 0, "unchanged": 11, "duplicates": 0}
    assert wh.read("quarantine").num_rows == 10


def test_duplicates_across_sources_keep_every_source_key_and_reingest_is_a_noop(tmp_path, wh):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "cat.png").write_bytes(png(9))
    (folder / "cat.txt").write_bytes(b"a cat")
    pq.write_table(pa.table({"image": [png(9), png(10)], "caption": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    c1 = ingest_shard(read_image_folder(str(folder), "folder"), wh, "run1", "folder")
    c2 = ingest_shard(read_parquet(str(tmp_path / "p.parquet"), "parquet"), wh, "run1", "parquet")
    assert (c1["kept"], c2["kept"], c2["quarantined"]) == (1, 1, 1)
    sources = wh.read("pair_sources").to_pylist()
    cat = [s for s in sources if s["source"] == "folder"][0]["pair_id"]
    assert sorted(s["source"] for s in sources if s["pair_id"] == cat) == ["folder", "parquet"]
    again = ingest_shard(read_parquet(str(tmp_path / "p.parquet"), "parquet"), wh, "run2", "parquet")
    assert again == {"read": 2, "kept": 0, "quarantined": 0, "unchanged": 2, "duplicates": 0}
    assert wh.read("pairs").num_rows == 2


def test_schema_changes_name_the_column_and_file(tmp_path):
    pq.write_table(pa.table({"image": [png(1)], "text": ["renamed caption column"]}), tmp_path / "p.parquet")
    with pytest.raises(SchemaChangeError, match=r"p\.parquet.*'caption'"):
        list(read_parquet(str(tmp_path / "p.parquet"), "parquet"))
    (tmp_path / "l.csv").write_text("path,title\nx.png,hi\n")
    with pytest.raises(SchemaChangeError, match=r"l\.csv.*'filepath'"):
        list(read_csv(str(tmp_path / "l.csv"), "csv"))


def test_batch_rule_failure_names_the_expectation():
    import pandas as pd

    with pytest.raises(BatchValidationError, match=r"read = kept \+ quarantined"):
        check_batch(pd.DataFrame({c: [] for c in ["pair_id", "source", "source_key", "caption", "image_uri",
                                                   "image_sha256", "width", "height", "image_format", "image",
                                                   "ingest_run_id"]}), read=5, kept=2, quarantined=2)


def test_warehouse_parts_are_atomic_and_hive_partitioned(tmp_path, wh):
    import duckdb

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(png(1))
    (tmp_path / "f" / "a.txt").write_text("a")
    ingest_shard(read_image_folder(str(tmp_path / "f"), "folder"), wh, "run1", "s0")
    files = [os.path.relpath(os.path.join(d, f), wh.root) for d, _, fs in os.walk(wh.root) for f in fs]
    assert "pairs/run=run1/s0.parquet" in files and not any(f.endswith(".tmp") for f in files)
    n = duckdb.connect().execute(f"select count(*) from read_parquet('{wh.root}/pairs/**/*.parquet', hive_partitioning=true) "
                   "where run = 'run1'").fetchone()[0]
    assert n == 1


def test_ingest_stage_records_a_run_resumes_and_reconciles(tmp_path, wh):
    from chips_core.platform.query import connect, query, run_audits
    from chips_core.platform.readers import SourceSpec, shard_name
    from chips_core.stages import ingest_stage

    shards = []
    for s in range(3):
        path = tmp_path / f"shard-{s}.tar"
        members = [m for i in range(3) for m in ((f"k{s}{i}.png", png(10 * s + i)),
                                                  (f"k{s}{i}.txt", f"caption {s} {i}".encode()))]
        make_tar(path, members + [(f"zz{s}.png", png(1)), (f"zz{s}.txt", b"the same pair in every shard")])
        shards.append(str(path))
    spec = SourceSpec("wds", "webdataset", tuple(shards))
    # simulate a crash after the first shard: its parts exist under the run id, the run row does not
    from chips_core.stages.ingest import ingest_shard, known_pairs

    with known_pairs(wh) as state:
        first = ingest_shard(read_webdataset(shards[0], "wds"), wh, "ingest-A", shard_name(spec, shards[0]),
                             state.seen, state.recorded)
    out = ingest_stage([spec], wh, run_id="ingest-A")
    assert out["read"] == 12 and out["kept"] == 10 and out["quarantined"] == 2 and first["kept"] == 4
    con = connect(wh)
    run = query(con, "select * from stg_runs where run_id = 'ingest-A'").to_pylist()[0]
    assert (run["rows_in"], run["rows_out"], run["rows_quarantined"], run["status"]) == (12, 10, 2, "succeeded")
    assert all(t.num_rows == 0 for t in run_audits(con).values()), run_audits(con)
    again = ingest_stage([spec], wh)
    assert again["unchanged"] == 12 and again["kept"] == 0
    # per source, this run's counts (what the run summary prints before the warehouse's record)
    assert again["sources"] == {"wds": {"read": 12, "kept": 0, "quarantined": 0, "unchanged": 12, "duplicates": 0}}
    assert out["sources"] == {"wds": {"read": 12, "kept": 10, "quarantined": 2, "unchanged": 0, "duplicates": 2}}
    assert all(t.num_rows == 0 for t in run_audits(connect(wh)).values())
    causes = query(connect(wh), "select reason, cause from stg_quarantine").to_pylist()
    assert causes and all(r["cause"] == r["reason"] or r["cause"].startswith("read_error (") for r in causes)


def test_data_docs_written_beside_the_warehouse(tmp_path, wh):
    from chips_core.platform.readers import SourceSpec
    from chips_core.stages import ingest_stage

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(png(1))
    (tmp_path / "f" / "a.txt").write_text("a caption")
    ingest_stage([SourceSpec("folder", "folder", (str(tmp_path / "f"),))], wh)
    docs = os.path.join(wh.root, "data_docs")
    assert os.path.isfile(os.path.join(docs, "index.html"))
    pages = [f for d, _, fs in os.walk(os.path.join(docs, "validations")) for f in fs if f.endswith(".html")]
    assert pages, "batch-rule validation results are rendered"
    assert os.path.isfile(os.path.join(docs, "expectations", "chips_row_rules.html"))
    # the offline index: every validation page linked with its status, and nothing fetched from a network
    page = open(os.path.join(docs, "chips.html")).read()
    rels = [os.path.relpath(os.path.join(d, f), docs) for d, _, fs in os.walk(os.path.join(docs, "validations"))
            for f in fs if f.endswith(".html")]
    assert all(f"href='{r}'" in page for r in rels)
    assert page.count(">Succeeded<") == len(rels) and "chips_row_rules.html" in page
    assert "http://" not in page and "https://" not in page


def test_parquet_with_an_image_path_column_and_tsv(tmp_path, wh):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(21))
    pq.write_table(pa.table({"path": ["img/a.png", "img/none.png"], "caption": ["a path pair", "gone"]}),
                   tmp_path / "paths.parquet")
    c = ingest_shard(read_parquet(str(tmp_path / "paths.parquet"), "pq", path_col="path"), wh, "r", "pq")
    assert (c["kept"], c["quarantined"]) == (1, 1)
    (tmp_path / "list.tsv").write_text("filepath\ttitle\nimg/a.png\ta tsv caption\n")
    c = ingest_shard(read_csv(str(tmp_path / "list.tsv"), "tsv"), wh, "r", "tsv")
    assert c["kept"] == 1  # different caption, so a different pair


@pytest.mark.parametrize("two_pass", [False, True])  # one pass in process, or judged and written as an executor's tasks
@pytest.mark.parametrize("rerun_id", ["ingest-K", None])  # resumed under the same run id, or a new run (a refresh)
def test_a_shard_killed_between_its_parts_loses_nothing_on_rerun(tmp_path, wh, monkeypatch, rerun_id, two_pass):
    """Killed after a shard's ``pair_sources`` and ``quarantine`` parts but before its ``pairs`` part (the one that
    marks it complete): the next ingest must not read those orphan rows as "already recorded", or the shard's pairs
    would be skipped as unchanged and never written. The two-pass ingest also leaves its staging behind: the next
    ingest removes it and judges the shard again."""
    from chips_core.platform.query import connect, run_audits
    from chips_core.platform.readers import SourceSpec
    from chips_core.stages import ingest_stage
    from chips_core.stages.common import local_map

    mapper = local_map if two_pass else None

    path = tmp_path / "shard.tar"
    make_tar(path, [m for i in range(4) for m in ((f"k{i}.png", png(i)), (f"k{i}.txt", f"caption {i}".encode()))]
             + [("bad.png", b"not an image"), ("bad.txt", b"a caption")])
    spec = SourceSpec("wds", "webdataset", (str(path),))
    real = Warehouse.write

    def killed_before_pairs(self, table, *a, **k):
        if table == "pairs":
            raise KeyboardInterrupt("killed")
        return real(self, table, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(Warehouse, "write", killed_before_pairs)
        with pytest.raises(KeyboardInterrupt):
            ingest_stage([spec], wh, run_id="ingest-K", map_shards=mapper)
    assert wh.read("pair_sources").num_rows == 4 and wh.read("pairs").num_rows == 0  # the orphan parts
    assert wh.fs.exists(wh.path("_ingest_staging")) == two_pass
    out = ingest_stage([spec], wh, run_id=rerun_id, map_shards=mapper)
    assert not wh.fs.exists(wh.path("_ingest_staging")) and not wh.fs.exists(wh.path("_ingest_decisions"))
    assert (out["read"], out["kept"], out["quarantined"], out["unchanged"]) == (5, 4, 1, 0)
    assert wh.read("pairs").num_rows == 4 and wh.read("pair_sources").num_rows == 4
    assert wh.read("quarantine").num_rows == 1
    assert all(t.num_rows == 0 for t in run_audits(connect(wh)).values())


def _contents(wh: Warehouse) -> dict:
    """Every ingest table's rows without their run ids (two runs' ids differ), in a canonical order."""
    out = {}
    for table, drop in (("pairs", "ingest_run_id"), ("pair_sources", "ingest_run_id"), ("quarantine", "run_id")):
        rows = wh.read(table).drop_columns([drop, "run"]).to_pylist()
        out[table] = sorted(rows, key=lambda r: (r["source"], r["source_key"], r.get("reason") or ""))
    return out


@pytest.mark.parametrize("images", ["copy", "reference"])
def test_the_two_pass_ingest_an_executor_runs_writes_what_the_one_pass_ingest_writes(tmp_path, images):
    """Ingest on an executor (Dask) judges each shard on a worker, de-duplicates on the driver in shard order, and
    writes on a worker; here the same three steps run through the in-process map. Duplicates within and across
    shards and sources, every quarantine reason's row, a re-ingest (all unchanged) and a half-new source give the
    same rows and counts as the one-pass ingest, and no staging is left behind."""
    from chips_core.platform.readers import SourceSpec
    from chips_core.stages import ingest_stage
    from chips_core.stages.common import local_map

    shards = []
    for s in range(3):
        path = tmp_path / f"shard-{s}.tar"
        members = [m for i in range(4) for m in ((f"k{s}{i}.png", png(10 * s + i)),
                                                  (f"k{s}{i}.txt", f"caption {s} {i}".encode()))]
        members += [(f"zz{s}.png", png(1)), (f"zz{s}.txt", b"the same pair in every shard"),
                    (f"bad{s}.png", b"not an image"), (f"bad{s}.txt", b"a caption"),
                    (f"dup{s}.png", png(10 * s)), (f"dup{s}.txt", f"caption {s} 0".encode()),  # within the shard
                    (f"e{s}.png", png(7)), (f"e{s}.txt", b"   ")]
        make_tar(path, members)
        shards.append(str(path))
    wds = SourceSpec("wds", "webdataset", tuple(shards[:2]), images=images)
    other = SourceSpec("other", "webdataset", tuple(shards[1:]), images=images)  # shard 1 again, and shard 2
    runs = {}
    for how, mapper in (("one-pass", None), ("two-pass", local_map)):
        wh = Warehouse(str(tmp_path / f"wh-{how}"))
        counts = [ingest_stage([wds], wh, map_shards=mapper), ingest_stage([wds, other], wh, map_shards=mapper)]
        runs[how] = ([{k: c[k] for k in ("read", "kept", "quarantined", "unchanged", "sources")} for c in counts],
                     _contents(wh))
        assert not wh.fs.exists(wh.path("_ingest_staging")) and not wh.fs.exists(wh.path("_ingest_decisions"))
    assert runs["two-pass"] == runs["one-pass"]
    first, second = runs["one-pass"][0]
    assert (first["read"], first["kept"], first["quarantined"], first["unchanged"]) == (16, 9, 7, 0)
    assert second["sources"]["wds"]["unchanged"] == 16 and second["sources"]["other"]["unchanged"] == 0
    assert second["sources"]["other"]["kept"] == 4  # shard 2's own pairs; shard 1's are duplicates of wds's
