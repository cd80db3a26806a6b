#!/usr/bin/env bash
# The GPU checks in one command (issue 12): the GPU test subset and the precision / throughput benchmark,
# reports written to --out. Installs nothing from a hub.
#
#   benchmarks/gpu_check.sh --out DIR                      # on a CUDA machine
#   benchmarks/gpu_check.sh --out DIR --device cpu --quick # here: the same script, CPU, small sizes
#
# Python: .venv/bin/python when the checkout has one, else python3 (a GPU image with torch). open_clip and its
# tokenizer's packages, where that Python lacks them, come from wheels in .whl/ (pip download, see
# docs/benchmarks/featurize_precision.md) installed with --no-index into a temporary folder.
set -euo pipefail
OUT="" DEVICE=cuda QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR [--device cuda|cpu] [--quick])" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required" >&2; exit 2; }
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! $PY -c "import open_clip, ftfy" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_check.sh: $PY lacks open_clip and there is no .whl/ folder of wheels" >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/chips-site .whl/*.whl
  export PYTHONPATH=/tmp/chips-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
$PY - "$DEVICE" <<'EOF' | tee "$OUT/env.txt"
import sys, torch, open_clip
dev = sys.argv[1]
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
      f"cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
if dev.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: --device cuda but torch sees no CUDA device")
EOF
# the tests: on CUDA the gpu-marked ones (CUDA featurize = CPU featurize, bf16 on CUDA, mixing precisions
# refused, the featurize stage resumed at its precision); on CPU the same files, where the gpu-marked tests skip
# and their CPU twins run
TESTS="tests/scoring/test_invariance.py tests/scoring/test_precision.py tests/stages/test_precision_stage.py"
MARK="gpu"
[ "$DEVICE" = cpu ] && MARK="not gpu"
set +e
$PY -m pytest -q -p no:cacheprovider -m "$MARK" $TESTS 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
$PY benchmarks/featurize_precision.py --device "$DEVICE" $QUICK --out "$OUT/featurize_precision.md" \
  --json "$OUT/featurize_precision.json"
# end to end from JPEG tar shards (the featurize stage: DataLoader workers, the warehouse); the stages need the
# platform's packages (duckdb, great_expectations, ...): where this Python lacks them the step says so and skips
if $PY -c "import chips_core.stages" 2>"$OUT/stages_import.txt"; then
  if [ -n "$QUICK" ]; then
    $PY benchmarks/featurize_shards.py --device "$DEVICE" --models demo --pairs 512 --workers 0,2 \
      --out "$OUT/featurize_shards.md" --json "$OUT/featurize_shards.json"
  else
    $PY benchmarks/featurize_shards.py --device "$DEVICE" --models ViT-B-32,ViT-B-16 --precisions bf16,fp32 \
      --pairs 4096 --workers 0,4,15 --out "$OUT/featurize_shards.md" --json "$OUT/featurize_shards.json"
    $PY benchmarks/featurize_shards.py --device "$DEVICE" --models ViT-B-16 --precisions bf16 --pairs 2048 \
      --workers 15 --compile --out "$OUT/featurize_shards_compile.md" --json "$OUT/featurize_shards_compile.json"
  fi
else
  echo "gpu_check.sh: featurize_shards.py skipped, the stages do not import here: $(tail -1 "$OUT/stages_import.txt")"
fi
echo "gpu_check.sh: tests exit status $tests_rc; reports in $OUT"
exit "$tests_rc"
