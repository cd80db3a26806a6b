"""What ingest has already recorded, on disk instead of in memory: the pair ids kept (with the source key that
first kept each) and every (pair, source, source key) and (source, source key, quarantine reason) recorded.

Ingest de-duplicates every record against this state and against the records before it, so a re-ingest of an
unchanged source is a no-op. The state is an SQLite file (the standard library's B-tree: point lookups, a page
cache of a few MiB, nothing per pair in Python memory) in a temporary folder, built at the start of each ingest
run by streaming the warehouse's ``pair_sources`` and ``quarantine`` tables in batches. Memory stays flat in the
pool's size; the file costs about 150 bytes of temporary disk per recorded row.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile

import pyarrow.dataset as pads

from .warehouse import Warehouse

SEP = "\x1f"


class SeenPairs:
    """``pair_id -> source key that first kept it``: the ``in``, ``[]`` and ``[] =`` of the dict it replaces."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __contains__(self, pair_id: str) -> bool:
        return self.con.execute("select 1 from seen where pair_id = ?", (pair_id,)).fetchone() is not None

    def __getitem__(self, pair_id: str) -> str:
        row = self.con.execute("select source_key from seen where pair_id = ?", (pair_id,)).fetchone()
        if row is None:
            raise KeyError(pair_id)
        return row[0]

    def __setitem__(self, pair_id: str, source_key: str) -> None:
        self.con.execute("insert or ignore into seen values (?, ?)", (pair_id, source_key))

    def setdefault(self, pair_id: str, source_key: str) -> str:
        self[pair_id] = source_key
        return self[pair_id]

    def __len__(self) -> int:
        return self.con.execute("select count(*) from seen").fetchone()[0]


class RecordedRows:
    """The set of recorded row keys (tuples of strings): ``in`` and ``add``."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    @staticmethod
    def _key(key: tuple) -> str:
        return SEP.join("" if k is None else str(k) for k in key)

    def __contains__(self, key: tuple) -> bool:
        return self.con.execute("select 1 from recorded where k = ?", (self._key(key),)).fetchone() is not None

    def add(self, key: tuple) -> None:
        self.con.execute("insert or ignore into recorded values (?)", (self._key(key),))

    def update(self, keys) -> None:
        self.con.executemany("insert or ignore into recorded values (?)", ((self._key(k),) for k in keys))

    def __len__(self) -> int:
        return self.con.execute("select count(*) from recorded").fetchone()[0]


class IngestState:
    """The on-disk state of one ingest run (a context manager; the file is removed on exit)."""

    BATCH = 65536

    def __init__(self, wh: Warehouse | None = None, folder: str | None = None):
        self._dir = tempfile.mkdtemp(prefix="chips-ingest-", dir=folder)
        self.path = os.path.join(self._dir, "state.sqlite")
        # one open transaction for the whole run (nothing here must survive a crash: the file is rebuilt each
        # run): a transaction per statement cost ~8x per lookup-and-insert
        self.con = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
        for pragma in ("journal_mode = off", "synchronous = off", "temp_store = file", "cache_size = -16384"):
            self.con.execute(f"pragma {pragma}")
        self.con.execute("create table seen (pair_id text primary key, source_key text) without rowid")
        self.con.execute("create table recorded (k text primary key) without rowid")
        self.seen, self.recorded = SeenPairs(self.con), RecordedRows(self.con)
        if wh is not None:
            self.load(wh)

    def load(self, wh: Warehouse) -> None:
        """Stream what the warehouse has recorded into the state (batches of rows; nothing held whole)."""
        for table, cols in (("pair_sources", ["pair_id", "source", "source_key"]),
                            ("quarantine", ["source", "source_key", "reason"])):
            if not wh.fs.exists(wh.table_dir(table)):
                continue
            ds = pads.dataset(wh.table_dir(table), filesystem=wh.fs, format="parquet", partitioning="hive")
            for batch in ds.to_batches(columns=cols, batch_size=self.BATCH):
                c = [batch.column(n).to_pylist() for n in cols]
                if table == "pair_sources":
                    self.con.executemany("insert or ignore into seen values (?, ?)", zip(c[0], c[2]))
                    self.recorded.update(zip(*c))
                else:
                    self.recorded.update(("quarantine", *row) for row in zip(*c))

    def close(self) -> None:
        self.con.close()
        for name in os.listdir(self._dir):
            os.remove(os.path.join(self._dir, name))
        os.rmdir(self._dir)

    def __enter__(self) -> "IngestState":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
