#!/usr/bin/env bash
# Render an HTML page in Debian's headless chromium and save a PNG screenshot:
#   scripts/screenshot.sh chips-report-<run>/index.html report.png
# (apt-get install -y chromium first; nothing here reaches the network.)
set -euo pipefail
page=$(realpath "$1"); out=$(realpath -m "${2:-screenshot.png}")
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1200,${HEIGHT:-3000} --screenshot="$out" "file://$page" >/dev/null 2>&1
rm -rf "$profile"
[ -s "$out" ] && echo "screenshot: $out"
