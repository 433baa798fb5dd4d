#!/usr/bin/env bash
# Builds .venv-llmc: llm-compressor (the real quantizer) for the quantized-checkpoint fixtures of
# tests/test_quantized.py. llmcompressor 0.14 pins transformers 5.17, so it lives apart from the main env,
# which reads its output with compressed-tensors beside transformers 5.24.
# Idempotent: a stamp naming what was installed makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-llmc
PY=${PYTHON:-$(command -v python || command -v python3)}
WANT="torch==2.13.0 llmcompressor==0.14.0.1"
STAMP="$VENV/.halfsafe-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "llmc-env: $VENV is ready ($WANT)"
    exit 0
fi
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# torch is pinned in the same command: an unpinned torch resolves to a multi-GB CUDA build.
# halfsafe itself is not installed here: the fixture script needs llm-compressor and transformers only.
"$VENV/bin/pip" install --quiet $WANT
# torchvision wheels built for another torch break transformers' imports; text models need none of them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import llmcompressor, compressed_tensors, transformers; print('llmc-env: llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
echo "$WANT" > "$STAMP"
