"""`chips demo` against a Prefect API kept by `chips server` (which runs `prefect server start`; not the test
harness): every flow run of the demo is recorded there."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # real Prefect runs / training: deselect with -m 'not slow'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("chips server did not come up: " + (tmp_path / "server.log").read_text()[-2000:])
    yield url, env
    proc.terminate()
    proc.wait(timeout=60)


def test_demo_against_chips_server(prefect_server, tmp_path):
    url, env = prefect_server
    env = {**env, "PREFECT_API_URL": url, "CHIPS_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--workdir", str(tmp_path / "demo"),
                          "--pool-size", "80", "--eval-size", "16", "--steps", "20"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    req = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        runs = json.loads(r.read())
    states = {run["name"]: run["state_type"] for run in runs}
    assert len(runs) >= 5 and set(states.values()) == {"COMPLETED"}, states
