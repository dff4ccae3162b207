#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels bench/gpu.sh installs on the GPU machine, which
# has python 3.12 with torch, transformers, peft, accelerate and triton but cannot download.
# Versions are the ones constraints.txt pins. gpu.sh installs a wheel only when its
# distribution is missing there (never torch, transformers or anything they already brought).
#
# Usage: bash bench/gpu_wheels.sh   (writes .whl/, git-ignored; carry it with the run)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
# What multitune, its GPU tests and bench/peer_trl.py import beyond the GPU machine's stack.
NAMES=(
    trl datasets pyarrow dill multiprocess xxhash pandas python-dateutil tzdata
    pydantic pydantic_core annotated-types typing-inspection
    rich markdown-it-py mdurl Pygments
    sacrebleu portalocker tabulate colorama lxml regex
    pytest iniconfig pluggy
)
pins() {  # NAME==VERSION from constraints.txt (case- and -/_-insensitive)
    local want
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    while IFS= read -r line; do
        [[ "$line" == *==* ]] || continue
        if [[ $(echo "${line%%==*}" | tr 'A-Z_' 'a-z-') == "$want" ]]; then
            echo "$line"
            return
        fi
    done < constraints.txt
    echo "no pin for $1 in constraints.txt" >&2
    return 1
}
mkdir -p "$DEST"
for name in "${NAMES[@]}"; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$DEST" "$(pins "$name")"
done
ls "$DEST"
# The device tool carries at most 64 MiB of ignored paths; pyarrow alone is 55 MB. Over that,
# copy the folder to an untracked path git does not ignore (it travels with the working tree) and
# run gpu.sh with WHEELS=that-path, or drop the wheels the GPU machine already has.
total=$(du -sm "$DEST" | cut -f1)
echo "$total MiB in $DEST$( ((total > 64)) && echo ": over the 64 MiB carry limit, see above")"
