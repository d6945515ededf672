#!/usr/bin/env bash
# Installs everything the agent, its tests and its demo need on a fresh Debian 12 / Raspberry Pi OS
# machine, as root: the Debian packages (mosquitto, age, ffmpeg, chromium) when missing, a venv in
# .venv, and this package with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(mosquitto age ffmpeg chromium sqlite3 python3-venv systemd)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian broker must not run as a system service here: tests and the demo start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: ready (.venv)"
