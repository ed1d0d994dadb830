#!/usr/bin/env bash
# Create .venv and install fedmoe with its dev extras. Idempotent: a second call with the same
# pyproject.toml reuses the environment and returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.fedmoe-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip, minus the noise of find-links folders this machine's pip.conf names but lacks.
pipq() { .venv/bin/python -m pip -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pipq install --upgrade pip
# The CPU build of torch first: a bare `torch` requirement may pull a multi-GB CUDA build.
# pyproject.toml keeps a range, so elsewhere any compatible build will do.
pipq install "torch==2.13.0" || pipq install "torch>=2.4,<3"
# llama.cpp (the gguf extra) is compiled from the sdist: about 10 CPU-minutes (5 minutes on two
# free cores). Only the library Python loads is built (no multimodal library, tools, examples,
# tests or server). pip keeps the wheel it builds in its cache (`pip cache dir`, wheels/), so a
# machine compiles once: keep that directory between CI runs. The cache is keyed by version,
# not by CMAKE_ARGS or CFLAGS, and the build targets this CPU (-march=native): do not share it
# between machines of different CPUs (`pip cache remove llama_cpp_python` forces a rebuild).
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# No AMX: on a VM whose CPU lists amx_tile but whose hypervisor does not enable the tile state,
# -march=native builds ggml's AMX kernels and the first q8_0 matmul dies of SIGILL at
# `ldtilecfg` (seen on this project's 2-core Xeon machines). An explicit -mno-* wins over
# -march=native in GCC and Clang whatever the order; AVX-512 stays.
if [ "$(uname -m)" = x86_64 ]; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
pipq install "llama-cpp-python==0.3.36"
pipq install -e ".[dev]"
.venv/bin/python -c "import fedmoe, flwr, torch, transformers, peft, hydra, wandb, gguf, llama_cpp"
echo "$want" > "$stamp"
echo "fedmoe installed in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
