#!/usr/bin/env bash
# Debian's Chromium, for the check that the notebook's HTML really shows its images
# (scripts/check_html.py). Does nothing when chromium is already there.
set -euo pipefail
command -v chromium >/dev/null && { echo "chromium: $(command -v chromium)"; exit 0; }
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
install() { $SUDO apt-get install -y --no-install-recommends chromium; }
install || { $SUDO apt-get update && install; }
echo "chromium: $(command -v chromium)"
