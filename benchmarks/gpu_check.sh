#!/usr/bin/env bash
# The GPU check in one call, from a fresh clone: install the pinned environment, then run
# benchmarks/gpu_check.py on CUDA (correctness of the CUDA path, MallowsPO against TRL's DPOTrainer
# on a 630 M-parameter model, padding_free, the phi link's kernel count). About 5 minutes of
# checks on one H200 after the install; outputs in runs/gpu_check/ (gpu_check.md, gpu_check.json).
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --out DIR --budget-s 300]
#
# Environment:
#   GPU_CHECK_VENV=DIR    the virtual environment (default .venv; created when missing)
#   GPU_CHECK_INSTALL=0   use that environment as it is, without pip (e.g. a machine without an index)
# pip's own variables (PIP_INDEX_URL, PIP_FIND_LINKS, ...) point the install at a mirror or a wheelhouse.
# On a CUDA machine torch==2.13.0 from PyPI is the CUDA build (with its nvidia-* and triton wheels).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${GPU_CHECK_VENV:-.venv}"
start=$SECONDS

if [[ "${GPU_CHECK_INSTALL:-1}" != "0" ]]; then
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip || echo "[gpu-check] pip upgrade failed; going on"
    if ! "$venv/bin/python" -m pip install --quiet -r requirements-dev.txt \
        || ! "$venv/bin/python" -m pip install --quiet --no-deps -e .; then
        echo "[gpu-check] installing the pinned requirements failed (no package index reachable?)." >&2
        echo "[gpu-check] Point PIP_INDEX_URL / PIP_FIND_LINKS at a mirror or wheelhouse, or set" >&2
        echo "[gpu-check] GPU_CHECK_VENV to an environment that has them and GPU_CHECK_INSTALL=0." >&2
        exit 3
    fi
    echo "[gpu-check] environment ready in $((SECONDS - start)) s"
fi

"$venv/bin/python" -c "import torch; print('[gpu-check] torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count())"
status=0
"$venv/bin/python" benchmarks/gpu_check.py --device cuda "$@" || status=$?
echo "[gpu-check] done in $((SECONDS - start)) s (exit $status)"
exit "$status"
