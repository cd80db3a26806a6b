"""The layers import downward only (ARCHITECTURE.md): a test that fails when an import goes up."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer -> the chips_core layers it may import (besides itself)
BOTTOM = {"errors", "util"}
ALLOWED = {
    "errors": set(),
    "util": {"errors"},
    "scoring": BOTTOM,
    "platform": BOTTOM | {"scoring"},
    "train": BOTTOM | {"scoring"},
    "stages": BOTTOM | {"scoring", "platform", "train"},
}


def _layer(module: str) -> str | None:
    """The chips_core layer (sub-package or module) a dotted name lies in; None outside chips_core or
    for a name of the package root itself (``from chips_core import __version__``)."""
    parts = module.split(".")
    if parts[0] != "chips_core" or len(parts) < 2:
        return None
    found = (ROOT / "chips_core" / parts[1]).is_dir() or (ROOT / "chips_core" / f"{parts[1]}.py").is_file()
    return parts[1] if found else None


def _imports(source: str, rel: Path) -> list[tuple[int, str]]:
    """Every module a file imports, anywhere in it, with relative imports resolved from ``rel``
    (its path inside the repository)."""
    package = ".".join(rel.with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, module)] if node.module else [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def _violations(source: str, rel: Path) -> list[str]:
    own = _layer(".".join(rel.with_suffix("").parts))
    bad = []
    for line, module in _imports(source, rel):
        top = module.split(".")[0]
        target = _layer(module)
        if top in ("flows", "prefect", "prefect_dask"):
            bad.append(f"{rel}:{line} imports {module} (chips_core never imports orchestration)")
        elif target and target != own and own in ALLOWED and target not in ALLOWED[own]:
            bad.append(f"{rel}:{line} imports {module} ({own} may import {sorted(ALLOWED[own])})")
    return bad


@pytest.mark.parametrize("path", sorted((ROOT / "chips_core").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path):
    assert _violations(path.read_text(), path.relative_to(ROOT)) == []


def test_the_check_catches_an_upward_import():
    """The rule itself can fail: scoring importing the platform, a stage or Prefect; the platform a
    stage or a flow; training the platform."""
    scoring, platform = Path("chips_core/scoring/probe.py"), Path("chips_core/platform/probe.py")
    assert len(_violations("from ..platform.warehouse import Warehouse\nfrom chips_core.stages import run_pipeline\n",
                           scoring)) == 2
    assert len(_violations("def f():\n    import prefect\n", scoring)) == 1
    assert len(_violations("from ..stages.pipeline import run_pipeline\nfrom flows.chips_flows import pipeline_flow\n",
                           platform)) == 2
    assert len(_violations("from ..platform import query\n", Path("chips_core/train/probe.py"))) == 1
    assert _violations("from .. import __version__\nfrom ..scoring.score import METHODS\n", platform) == []
