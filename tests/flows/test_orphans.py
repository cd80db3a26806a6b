"""No orphans (issue 28): the temporary Prefect API a chips command starts dies with it, even on SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_the_temporary_api_dies_with_a_killed_chips_process(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect"),
           "CHIPS_CACHE": os.environ.get("CHIPS_CACHE", str(Path.home() / ".cache" / "chips"))}
    env.pop("PREFECT_API_URL")
    exe = str(Path(sys.executable).with_name("chips"))
    p = subprocess.Popen([exe, "demo", "--workdir", str(tmp_path / "demo"), "--pool-size", "150", "--eval-size", "30"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and server is None and p.poll() is None:
            server = next((c for c in _children(p.pid) if "server:create_app" in _cmdline(c)), None)
            time.sleep(0.5)
        assert server is not None, "the demo started no temporary Prefect API"
        assert "flows.prefect_child" in _cmdline(server)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        gone = time.time() + 15
        while time.time() < gone and Path(f"/proc/{server}").exists() and "server:create_app" in _cmdline(server):
            time.sleep(0.2)
        assert not (Path(f"/proc/{server}").exists() and "server:create_app" in _cmdline(server)), "orphaned Prefect API"
    finally:
        if p.poll() is None:
            p.kill()
        if server and Path(f"/proc/{server}").exists() and "server:create_app" in _cmdline(server):
            os.kill(server, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_ctrl_c_says_so_and_keeps_its_log_in_chips_log_dir(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "CHIPS_LOG_DIR": str(tmp_path / "logs"),
           "CHIPS_CACHE": os.environ.get("CHIPS_CACHE", str(Path.home() / ".cache" / "chips"))}
    env.pop("PREFECT_API_URL", None)
    exe = str(Path(sys.executable).with_name("chips"))
    p = subprocess.Popen([exe, "demo", "--workdir", str(tmp_path / "demo"), "--pool-size", "150", "--eval-size", "30"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and not any(
                "server:create_app" in _cmdline(c) for c in _children(p.pid)):
            time.sleep(0.5)
        assert p.poll() is None, "the demo ended before its temporary Prefect API started"
        os.kill(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "interrupted; rerun the same command to resume" in err
    assert list((tmp_path / "logs").glob("chips-interrupt-*.log")), "the shutdown log is not in CHIPS_LOG_DIR"
