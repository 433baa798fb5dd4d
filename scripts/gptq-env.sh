#!/usr/bin/env bash
# Builds .venv-gptq: GPTQModel and halfsafe (editable) for tests/test_quantized_gptq.py. GPTQModel is
# the real GPTQ quantizer of the fixtures and the library halfsafe reads GPTQ checkpoints through
# (formats/gptq.py); gptqmodel 7.6.0 pins numpy 2.2.6 and brings a dozen packages the main env does not
# have, so a GPTQ fix runs here, as a user with GPTQ checkpoints runs it beside GPTQModel.
# 7.6.0, not 7.7: 7.7 needs torch >= 2.14.
# Idempotent: a stamp naming what was installed makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gptq
PY=${PYTHON:-$(command -v python || command -v python3)}
WANT="torch==2.13.0 gptqmodel==7.6.0"
STAMPED="$WANT $(sha256sum pyproject.toml | cut -c1-16)"
STAMP="$VENV/.halfsafe-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMPED" && -x "$VENV/bin/python" ]]; then
    echo "gptq-env: $VENV is ready ($WANT)"
    exit 0
fi
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# torch is pinned in the same command: an unpinned torch resolves to a multi-GB CUDA build.
# gptqmodel 7.6.0 is an sdist; its setup.py builds no extension (its kernels compile at run time, on
# first use, and the CPU path the fixtures take needs none). halfsafe's own numpy>=1.24 takes 2.2.6.
"$VENV/bin/pip" install --quiet $WANT -e .
# torchvision wheels built for another torch break transformers' imports; text models need none of them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import gptqmodel, transformers, torch, halfsafe.formats.gptq; print('gptq-env: gptqmodel', gptqmodel.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "$STAMPED" > "$STAMP"
