"""The temporary Prefect API's process, tied to the chips process that started it.

Prefect starts its ephemeral API as ``python -m uvicorn ...`` and stops it when its parent exits normally. A
parent killed with SIGKILL never stops it: the server lived on under init, holding a port and memory, one more per
kill (issue 28). :func:`tie_ephemeral_api_to_this_process` makes Prefect start ``python -m flows.prefect_child
<parent pid> <uvicorn args>`` instead: this module runs uvicorn with a watchdog thread that ends the server within
a second of its parent's death (the parent pid changes when the parent is gone, whoever kills it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own shutdown
            time.sleep(5)
            os._exit(1)  # it did not stop in time
        time.sleep(0.5)


def main() -> None:
    parent = int(sys.argv[1])
    sys.argv = ["uvicorn", *sys.argv[2:]]
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="chips-parent-watch").start()
    from uvicorn.main import main as uvicorn_main

    uvicorn_main()


class _Subprocess:
    """The ``subprocess`` module as Prefect's server module sees it: the same, but its uvicorn command goes through
    :func:`main` with this process's pid."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, *rest, **kwargs):  # noqa: N802 - the name Prefect calls
        args = list(args)
        if args[1:3] == ["-m", "uvicorn"]:
            args = [args[0], "-m", "flows.prefect_child", str(os.getpid()), *args[3:]]
        return subprocess.Popen(args, *rest, **kwargs)


def tie_ephemeral_api_to_this_process() -> None:
    """Once per process: Prefect's ephemeral API server dies with this process, even on SIGKILL."""
    from prefect.server.api import server

    if not isinstance(server.subprocess, _Subprocess):
        server.subprocess = _Subprocess()


if __name__ == "__main__":
    main()
