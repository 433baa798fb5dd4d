#!/usr/bin/env bash
# Builds the side environments the tests need (scripts/envs/envs.txt lists them: vLLM, llm-compressor,
# GPTQModel), each in .venv-NAME beside this checkout, under its constraints file scripts/envs/NAME.txt.
# `bash scripts/test-envs.sh` builds all; `bash scripts/test-envs.sh vllm` one. Each is checked by
# importing what the tests use, and is a no-op when a stamp says it was built from the same inputs.
# The environments' packages install side by side (downloads and unpacking overlap); halfsafe's
# editable install and the checks then run one environment at a time (an editable build writes into
# this checkout). One line per environment says what it did and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
want=("$@")
trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; echo "${s%"${s##*[![:space:]]}"}"; }
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

install_packages() {  # NAME PACKAGES: the venv and its packages; writes its seconds to $logs/NAME.seconds
    local name=$1 packages=$2 venv=".venv-$1" start=$SECONDS
    [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
    # torch is pinned in the same command: an unpinned torch resolves to a multi-GB CUDA build.
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c "scripts/envs/$name.txt" $packages
    # PyPI's torchvision/torchaudio/torchcodec wheels are built for another torch and break the imports
    # ("operator torchvision::nms does not exist"); the text models the tests use need none of them.
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo $((SECONDS - start)) > "$logs/$name.seconds"
}

names=(); pids=(); found=0
declare -A line_packages line_editable line_check line_inputs
while IFS='|' read -r name packages editable check; do
    name=$(trim "$name")
    [[ -z "$name" || "$name" == \#* ]] && continue
    if ((${#want[@]})) && [[ ! " ${want[*]} " =~ " $name " ]]; then continue; fi
    found=$((found + 1))
    packages=$(trim "$packages"); editable=$(trim "$editable"); check=$(trim "$check")
    venv=".venv-$name"; stamp="$venv/.halfsafe-stamp"
    # halfsafe's metadata (its vllm.general_plugins entry point) is read at install: rebuild when it changes.
    inputs="$packages $(sha256sum "scripts/envs/$name.txt" | cut -c1-16)"
    [[ "$editable" == yes ]] && inputs="$inputs $(sha256sum pyproject.toml | cut -c1-16)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$inputs" && -x "$venv/bin/python" ]]; then
        echo "test-envs: $name ready in $venv ($packages), nothing to do"
        continue
    fi
    rm -f "$stamp"
    line_packages[$name]=$packages; line_editable[$name]=$editable; line_check[$name]=$check; line_inputs[$name]=$inputs
    install_packages "$name" "$packages" > "$logs/$name.log" 2>&1 &
    names+=("$name"); pids+=($!)
done < scripts/envs/envs.txt
if ((found == 0)); then
    echo "test-envs: no environment named '${want[*]}'; the names are in scripts/envs/envs.txt" >&2
    exit 2
fi

failed=0
for i in "${!names[@]}"; do
    name=${names[$i]}; venv=".venv-$name"
    if ! wait "${pids[$i]}"; then
        echo "test-envs: installing $name's packages into $venv failed: $(grep -v '^WARNING' "$logs/$name.log" | tail -n 1)" >&2
        failed=1
        continue
    fi
    start=$SECONDS
    if [[ "${line_editable[$name]}" == yes ]]; then
        "$venv/bin/pip" install --quiet --disable-pip-version-check -c "scripts/envs/$name.txt" -e . \
            > "$logs/$name.editable.log" 2>&1 || {
            echo "test-envs: installing halfsafe into $venv failed: $(grep -v '^WARNING' "$logs/$name.editable.log" | tail -n 1)" >&2
            failed=1; continue; }
    fi
    version=$("$venv/bin/python" -c "${line_check[$name]}" 2>&1 | tail -n 1) || {
        echo "test-envs: $name built in $venv but its check failed: $version" >&2; failed=1; continue; }
    echo "${line_inputs[$name]}" > "$venv/.halfsafe-stamp"
    echo "test-envs: $name built in $venv in $(( $(cat "$logs/$name.seconds") + SECONDS - start )) s, alongside the others ($version)"
done
exit $failed
