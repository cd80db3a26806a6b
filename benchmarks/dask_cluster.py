"""A real Dask cluster of processes on 127.0.0.1 (``dask scheduler``, ``dask worker``), started and killed around a
block: what ``benchmarks/distributed.py`` measures on and ``tests/flows/test_dask_executor.py`` tests on."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_cluster(tmp: Path, port: int | None = None, workers: int = 2, resources: dict[int, str] | None = None,
                 env: dict | None = None, dask: str | None = None):
    """A scheduler on 127.0.0.1 (``port``: a free one) and ``workers`` single-threaded worker processes, each in its
    own process group (worker ``i`` named ``w<i>``, declaring ``resources[i]``, e.g. ``"slot=1"``), with ``env`` added
    to this process's environment and the ``dask`` command (default: beside this Python); yields
    ``(address, processes)``, once every worker has joined; every process killed after."""
    from distributed import Client

    port = port or free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = dask or str(Path(sys.executable).with_name("dask"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__WORKER__DAEMON": "False", **(env or {})}
    start = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd=tmp)
    procs = {"scheduler": subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                            "--no-dashboard"], **start)}
    for i in range(workers):
        declared = ["--resources", resources[i]] if resources and i in resources else []
        procs[f"worker{i}"] = subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                                "--no-dashboard", "--name", f"w{i}", *declared], **start)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with Client(address, timeout=10) as c:
                    c.wait_for_workers(workers, timeout=120)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield address, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
