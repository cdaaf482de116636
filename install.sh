#!/usr/bin/env bash
# Installs everything ragmlx needs: the Python packages and, on Linux, what MLX's CPU backend is fast with: a
# real BLAS (OpenBLAS, which main.py preloads, since MLX's Linux CPU wheel ships the slow reference BLAS) and
# g++ (mx.compile builds its CPU kernels with it; without it, compiled steps run uncompiled). System packages
# need root or sudo; without them, requirements.txt's scipy-openblas32 wheel serves as the BLAS (decoding ~10%
# slower) and training runs uncompiled. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(uname -s)" = "Linux" ]; then
  missing=()
  # grep reads all of ldconfig's output: `grep -q` stops at the first match, and under pipefail ldconfig's SIGPIPE
  # would fail the test on a machine with a long library list
  ldconfig -p 2>/dev/null | grep -F "libopenblas.so.0" >/dev/null || missing+=(libopenblas0-pthread)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
      if { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}"; } >/dev/null 2>&1; then
        echo "install.sh: installed ${missing[*]}"
      else
        echo "install.sh: could not install ${missing[*]} (no root?); see the README's install notes"
      fi
    else
      echo "install.sh: no apt-get to install ${missing[*]}; see the README's install notes"
    fi
  fi
fi
python -m pip install -q -r requirements.txt
