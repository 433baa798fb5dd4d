#!/usr/bin/env bash
# Builds .venv-gptq: GPTQModel (the real GPTQ quantizer) for the GPTQ fixtures of
# tests/test_quantized_gptq.py. gptqmodel 7.6.0 pins numpy 2.2.6, so it lives apart from the main env,
# which reads its output without it. 7.6.0, not 7.7: 7.7 needs torch >= 2.14.
# Idempotent: a stamp naming what was installed makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gptq
PY=${PYTHON:-$(command -v python || command -v python3)}
WANT="torch==2.13.0 gptqmodel==7.6.0"
STAMP="$VENV/.halfsafe-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "gptq-env: $VENV is ready ($WANT)"
    exit 0
fi
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# torch is pinned in the same command: an unpinned torch resolves to a multi-GB CUDA build.
# gptqmodel 7.6.0 is an sdist; its setup.py builds no extension (its kernels compile at run time, on
# first use, and the CPU path the fixtures take needs none). halfsafe itself is not installed here.
"$VENV/bin/pip" install --quiet $WANT
# torchvision wheels built for another torch break transformers' imports; text models need none of them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import gptqmodel, transformers, torch; print('gptq-env: gptqmodel', gptqmodel.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
