#!/usr/bin/env bash
# Create the project virtualenv (.venv) and install chips with its test dependencies.
# Works offline except for PyPI; torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# scripts/constraints.txt pins every dependency, transitive ones too, to the versions the tests and benchmarks last
# ran with, so that a fresh machine (CI, the next benchmark run) installs the same set, not a new resolution.
# CHIPS_UNPINNED=1 resolves afresh; after the suite passes, `pip freeze --exclude-editable > scripts/constraints.txt`.
pins=(-c scripts/constraints.txt)
[ -n "${CHIPS_UNPINNED:-}" ] && pins=()
.venv/bin/python -m pip install -q "${pins[@]}" -e ".[dev${EXTRAS:+,$EXTRAS}]"
echo "chips: environment ready in .venv ($(.venv/bin/python -c 'import torch, open_clip; print("torch", torch.__version__, "open_clip", open_clip.__version__)'))"
