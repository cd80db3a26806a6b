"""docs/guide.md cannot rot: every `bash` block in it runs, in order, as one bash script in an empty folder (the
project's virtualenv first on PATH, a fresh PREFECT_HOME and demo cache), with the real `chips` command, its own
`chips server`, real Prefect flows, a real open_clip model and DuckDB over the warehouse's Parquet. The blocks must
cover every command of the README's command table."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.M | re.S)


def readme_commands() -> set[str]:
    """The subcommands of the README's command table (its rows' first cells: | `chips NAME ...` |)."""
    return set(re.findall(r"^\| `chips ([a-z]+)", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M))


def test_the_guide_covers_every_command_in_the_readme_table():
    blocks = "\n".join(bash_blocks((ROOT / "docs" / "guide.md").read_text(encoding="utf-8")))
    used = set(re.findall(r"(?:^|[\s(;&|$])chips ([a-z]+)", blocks, flags=re.M))
    table = readme_commands()
    assert len(table) >= 14, table  # the table parsed
    assert table <= used, f"README commands the guide does not run: {sorted(table - used)}"


def test_every_shell_block_of_the_guide_runs(tmp_path):
    blocks = bash_blocks((ROOT / "docs" / "guide.md").read_text(encoding="utf-8"))
    script = "set -euo pipefail\n" + "\n".join(f"echo '### block {n}'\n{b}" for n, b in enumerate(blocks))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(tmp_path / "prefect"),
               CHIPS_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its group holds the guide's `chips server &`
    try:
        out, _ = proc.communicate(timeout=840)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the background server, and anything left if it timed out
        except ProcessLookupError:
            pass
    (tmp_path / "guide.log").write_text(out)  # the whole transcript, beside the test's folders
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    assert out.count("### block") == len(blocks), tail
    for text in ("Next steps", "ingest ", "check ", "warmup ", "score run: score-", "final loss", "report: ",
                 "rescore ", "gc: "):
        assert text in out, (text, tail)
    methods = set(re.findall(r"[│┆|] (none|chips_plus) ", out))  # the mart's rows, before CPT and after
    assert methods == {"none", "chips_plus"}, tail
    assert (work / "my-wh" / "delta" / "subsets").is_dir() and any((work / "report").glob("*.html"))
