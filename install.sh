#!/usr/bin/env bash
# Installs everything ragmlx needs: the Python packages, and on Linux a fast BLAS (OpenBLAS) that main.py
# preloads for MLX, whose Linux CPU wheel ships the slow reference BLAS. The system OpenBLAS needs root; without
# it, requirements.txt's scipy-openblas32 wheel serves (decoding ~10% slower). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q "libopenblas.so.0"; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    if { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread; } >/dev/null 2>&1; then
      echo "install.sh: installed OpenBLAS (libopenblas0-pthread)"
    else
      echo "install.sh: could not install libopenblas0-pthread (no root?); MLX will use the scipy-openblas32 wheel's"
    fi
  else
    echo "install.sh: no apt-get; MLX will use the scipy-openblas32 wheel's OpenBLAS (see README)"
  fi
fi
python -m pip install -q -r requirements.txt
