"""Delta Lake publishing, read back with deltalake and with DuckDB; the warehouse on a real S3 API
(moto's server on loopback, through s3fs) — no mock of the filesystem layer."""
import numpy as np
import pyarrow as pa
import pytest

from chips_core.platform.lakehouse import publish_delta
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.score import METHODS
from chips_core.stages.score import scores_table


def _scores(run_id, n=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"p{i}" for i in range(n)]
    scores = {m: rng.normal(size=n) for m in (*METHODS, "w_learn", "w_relevance")}
    return scores_table(ids, scores, run_id)


def test_delta_publish_is_idempotent_and_readable_by_deltalake_and_duckdb(tmp_path):
    import duckdb
    from deltalake import DeltaTable

    wh = Warehouse(str(tmp_path / "wh"))
    publish_delta(wh, "scores", _scores("run-1"))
    publish_delta(wh, "scores", _scores("run-2", seed=1))
    uri = publish_delta(wh, "scores", _scores("run-1", seed=2))  # re-publish replaces run-1's rows
    dt = DeltaTable(uri)
    table = dt.to_pyarrow_table()
    assert table.num_rows == 10 and sorted(set(table.column("run_id").to_pylist())) == ["run-1", "run-2"]
    con = duckdb.connect()
    con.register("delta_scores", dt.to_pyarrow_dataset())
    rows = con.sql("select run_id, count(*) as n, min(rank) as r from delta_scores group by run_id order by run_id").fetchall()
    assert rows == [("run-1", 5, 1), ("run-2", 5, 1)]
    with pytest.raises(ValueError, match="one run at a time"):
        publish_delta(wh, "scores", pa.concat_tables([_scores("a"), _scores("b")]))


def test_iceberg_publish_is_idempotent_versioned_and_readable_by_polars_and_duckdb(tmp_path):
    import duckdb
    import polars as pl

    from chips_core.platform.lakehouse import iceberg_catalog, publish_iceberg

    wh = Warehouse(str(tmp_path / "wh"))
    publish_iceberg(wh, "scores", _scores("run-1"))
    first = iceberg_catalog(wh).load_table("chips.scores").current_snapshot().snapshot_id
    publish_iceberg(wh, "scores", _scores("run-2", seed=1))
    ident = publish_iceberg(wh, "scores", _scores("run-1", seed=2))  # re-publish replaces run-1's rows
    t = iceberg_catalog(wh).load_table(ident)
    now = t.scan().to_arrow()
    assert now.num_rows == 10 and sorted(set(now.column("run_id").to_pylist())) == ["run-1", "run-2"]
    assert [f.name for f in t.spec().fields] == ["run_id"]  # partitioned by run
    # time travel: the first version still reads, with run-1's first rows
    v1 = t.scan(snapshot_id=first).to_arrow()
    assert v1.num_rows == 5 and v1.sort_by("pair_id").column("chips").equals(_scores("run-1").sort_by("pair_id").column("chips"))
    # other engines: polars through the catalog's table, DuckDB over the current snapshot's data files
    assert pl.scan_iceberg(t).group_by("run_id").len().sort("run_id").collect().rows() == [("run-1", 5), ("run-2", 5)]
    files = [task.file.file_path.removeprefix("file://") for task in t.scan().plan_files()]
    rows = duckdb.sql(f"select run_id, count(*) from read_parquet({files!r}) group by run_id order by run_id").fetchall()
    assert rows == [("run-1", 5), ("run-2", 5)]


def test_delta_keeps_earlier_versions_readable_by_deltalake_polars_and_duckdb(tmp_path):
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    wh = Warehouse(str(tmp_path / "wh"))
    uri = publish_delta(wh, "scores", _scores("run-1"))
    publish_delta(wh, "scores", _scores("run-2", seed=1))
    assert DeltaTable(uri).to_pyarrow_table().num_rows == 10
    assert DeltaTable(uri, version=0).to_pyarrow_table().column("run_id").to_pylist() == ["run-1"] * 5
    # other engines, each at both versions: polars through deltalake, DuckDB over the version's Arrow dataset
    for version, want in ((0, [("run-1", 5)]), (1, [("run-1", 5), ("run-2", 5)])):
        assert pl.read_delta(uri, version=version).group_by("run_id").len().sort("run_id").rows() == want
        con = duckdb.connect()
        con.register("v", DeltaTable(uri, version=version).to_pyarrow_dataset())
        assert con.sql("select run_id, count(*) from v group by run_id order by run_id").fetchall() == want


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                                     "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="chips-test")
    yield opts
    server.stop()


def test_warehouse_on_an_s3_api_ingest_sql_and_unreachable_url(tmp_path, s3):
    import duckdb

    from chips_core.platform.query import connect, query, run_audits
    from chips_core.platform.readers import SourceSpec
    from chips_core.platform.warehouse import WarehouseError
    from chips_core.stages import ingest_stage

    from .test_ingest import png

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png(i))
        (folder / f"{i}.txt").write_text(f"caption {i}")
    wh = Warehouse("s3://chips-test/wh", storage_options=s3)
    spec = SourceSpec("folder", "folder", (str(folder),))
    out = ingest_stage([spec], wh)
    assert out["kept"] == 3
    # the pre-flight checks' DuckDB counts and the filtered id scan, over S3
    from chips_core.stages.common import require_quarantine_share, source_pair_ids
    assert require_quarantine_share(wh, [spec], 0.5) == {"folder": {"rows": 3, "quarantined": 0, "share": 0.0, "causes": {}}}
    assert len(source_pair_ids(wh, [spec])) == 3
    assert wh.read("pairs", columns=["caption"]).num_rows == 3
    assert wh.fs.glob("chips-test/wh/pairs/**/*.parquet") and not wh.fs.glob("chips-test/wh/pairs/**/*.tmp")
    con = connect(wh)  # DuckDB reads s3:// through the registered fsspec filesystem: no httpfs download
    assert query(con, "select count(*) as n from stg_pairs").column("n").to_pylist() == [3]
    assert all(t.num_rows == 0 for t in run_audits(con).values())
    for view in [r[0] for r in con.sql("select view_name from duckdb_views() where not internal").fetchall()]:
        query(con, f"select * from {view} limit 1")  # every sql/ view under the confinement, on S3
    wh.fs.pipe("chips-test/elsewhere/x.csv", b"a\n1\n")
    for sql in ("select * from read_csv('s3://chips-test/elsewhere/x.csv')", "select * from glob('s3://chips-test/**')"):
        with pytest.raises(duckdb.PermissionException):  # the bucket outside the warehouse's prefix
            query(con, sql)
    bad = {**s3, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
           "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(WarehouseError, match="s3://nowhere/wh"):
        Warehouse("s3://nowhere/wh", storage_options=bad)


def test_images_by_reference_from_a_tar_shard_on_an_s3_api(tmp_path, s3):
    """A WebDataset shard on S3 (moto's server, through s3fs) ingested by reference: the local warehouse keeps the
    tar member's URL, and reading the pairs fetches the member from S3 with the source's storage options."""
    import fsspec

    from chips_core.platform.images import SourceImageError
    from chips_core.platform.readers import SourceSpec
    from chips_core.stages import ingest_stage

    from .test_ingest import make_tar, png

    make_tar(tmp_path / "shard.tar", [m for i in range(4) for m in ((f"k{i}.png", png(i)), (f"k{i}.txt", f"c {i}".encode()))])
    fs = fsspec.filesystem("s3", **s3)
    fs.put(str(tmp_path / "shard.tar"), "chips-test/shards/shard.tar")
    spec = SourceSpec("web", "webdataset", ("s3://chips-test/shards/shard.tar",), images="reference", storage_options=s3)
    wh = Warehouse(str(tmp_path / "wh"), source_options={"web": s3})
    assert ingest_stage([spec], wh)["kept"] == 4
    rows = wh.read("pairs", columns=["pair_id", "image_uri", "image"]).to_pylist()
    assert all(r["image"] is None and r["image_uri"].endswith("::s3://chips-test/shards/shard.tar") for r in rows)
    got = wh.read_pairs([r["pair_id"] for r in rows], ["image"])
    assert sorted(g["image"] for g in got) == sorted(png(i) for i in range(4))
    assert "testing" not in wh.read("runs", columns=["config_json"]).column(0)[0].as_py()  # the credentials
    fs.rm("chips-test/shards/shard.tar")
    fsspec.AbstractFileSystem.clear_instance_cache()  # a new process: no cached tar index
    with pytest.raises(SourceImageError, match=r"pair .*: image 'tar://k\d.png::s3://chips-test/shards/shard.tar'"):
        Warehouse(str(tmp_path / "wh"), source_options={"web": s3}).read_pairs([rows[0]["pair_id"]], ["image"])


def test_a_column_added_since_the_tables_were_created_evolves_them(tmp_path):
    """runs.process was added after tables were published: publishing again adds the column (older rows null)."""
    import pyarrow as pa
    from deltalake import DeltaTable

    from chips_core.platform.lakehouse import iceberg_catalog, publish_delta, publish_iceberg
    from chips_core.platform.warehouse import SCHEMAS, Warehouse

    wh = Warehouse(str(tmp_path / "wh"))
    full = SCHEMAS["runs"].append(pa.field("root_run_id", pa.string()))
    old = full.remove(full.get_field_index("process"))
    first = pa.Table.from_pylist([{"run_id": "r1", "stage": "score", "status": "succeeded", "root_run_id": "r1"}], schema=old)
    second = pa.Table.from_pylist([{"run_id": "r2", "stage": "score", "status": "succeeded", "root_run_id": "r2",
                                    "process": "12:34"}], schema=full)
    from deltalake import write_deltalake

    from chips_core.platform.lakehouse import delta_uri
    write_deltalake(delta_uri(wh, "runs"), first, partition_by=["root_run_id"], mode="append")  # by an older version
    iceberg_catalog(wh).create_table("chips.runs", schema=first.schema).append(first)
    for publish in (publish_delta, publish_iceberg):
        publish(wh, "runs", second)
    rows = sorted(DeltaTable(str(tmp_path / "wh" / "delta" / "runs")).to_pyarrow_table().to_pylist(), key=lambda r: r["run_id"])
    assert [(r["run_id"], r["process"]) for r in rows] == [("r1", None), ("r2", "12:34")]
    ice = iceberg_catalog(wh).load_table("chips.runs").scan().to_arrow().to_pylist()
    assert sorted((r["run_id"], r["process"]) for r in ice) == [("r1", None), ("r2", "12:34")]
