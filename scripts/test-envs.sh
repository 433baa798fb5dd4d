#!/usr/bin/env bash
# Builds the side environments the tests need (scripts/envs/envs.txt lists them: vLLM, llm-compressor,
# GPTQModel), each in .venv-NAME beside this checkout, under its constraints file scripts/envs/NAME.txt.
# `bash scripts/test-envs.sh` builds all; `bash scripts/test-envs.sh vllm` one. Each is checked by
# importing what the tests use, and is a no-op when a stamp says it was built from the same inputs.
# One line per environment says what it did and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
want=("$@")
trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; echo "${s%"${s##*[![:space:]]}"}"; }
found=0
while IFS='|' read -r name packages editable check; do
    name=$(trim "$name")
    [[ -z "$name" || "$name" == \#* ]] && continue
    if ((${#want[@]})) && [[ ! " ${want[*]} " =~ " $name " ]]; then continue; fi
    found=$((found + 1))
    packages=$(trim "$packages"); editable=$(trim "$editable"); check=$(trim "$check")
    venv=".venv-$name"; constraints="scripts/envs/$name.txt"; stamp="$venv/.halfsafe-stamp"
    # halfsafe's metadata (its vllm.general_plugins entry point) is read at install: rebuild when it changes.
    inputs="$packages $(sha256sum "$constraints" | cut -c1-16)"
    [[ "$editable" == yes ]] && inputs="$inputs $(sha256sum pyproject.toml | cut -c1-16)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$inputs" && -x "$venv/bin/python" ]]; then
        echo "test-envs: $name ready in $venv ($packages), nothing to do"
        continue
    fi
    start=$SECONDS
    rm -f "$stamp"
    [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
    extra=(); [[ "$editable" == yes ]] && extra=(-e .)
    # torch is pinned in the same command: an unpinned torch resolves to a multi-GB CUDA build.
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" $packages "${extra[@]}"
    # PyPI's torchvision/torchaudio/torchcodec wheels are built for another torch and break the imports
    # ("operator torchvision::nms does not exist"); the text models the tests use need none of them.
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    version=$("$venv/bin/python" -c "$check" 2>&1 | tail -n 1) || {
        echo "test-envs: $name built in $venv but its check failed: $version" >&2; exit 1; }
    echo "$inputs" > "$stamp"
    echo "test-envs: $name built in $venv in $((SECONDS - start)) s ($version)"
done < scripts/envs/envs.txt
if ((found == 0)); then
    echo "test-envs: no environment named '${want[*]}'; the names are in scripts/envs/envs.txt" >&2
    exit 2
fi
