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
# What multitune, its GPU tests and bench/peer_trl.py import that the GPU image lacks. The image
# ("cuda", package list of 2026-11-17 in the device tool's KINDS.md) already has pyarrow,
# pandas, xxhash, rich, sacrebleu, scikit-learn, pyyaml, pytest, safetensors and tokenizers, so
# they stay behind and the folder fits the device tool's 64 MiB carry.
NAMES=(
    trl datasets dill multiprocess gguf
    pydantic pydantic_core annotated-types typing-inspection
)
# datasets needs pyarrow >= 24, and the image's pyarrow version is not on record. pyarrow alone
# is 55 MB, so it goes to its own folder (PYARROW_DEST); gpu.sh says when to carry it instead.
PYARROW_DEST=${PYARROW_DEST:-.whl-pyarrow}
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
mkdir -p "$PYARROW_DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$PYARROW_DEST" "$(pins pyarrow)"
ls "$DEST" "$PYARROW_DEST"
for folder in "$DEST" "$PYARROW_DEST"; do
    total=$(du -sm "$folder" | cut -f1)
    echo "$total MiB in $folder$( ((total > 64)) && echo ": over the 64 MiB carry limit")"
done
