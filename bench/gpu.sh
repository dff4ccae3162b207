#!/usr/bin/env bash
# Everything the project wants from one lent GPU (H100/H200), in one run of at most 8 minutes.
#
#  1. installs the wheels of bench/gpu_wheels.sh (WHEELS, default .whl/) whose distributions
#     are missing (the machine has python 3.12, torch, transformers, peft, accelerate, triton;
#     it cannot download), and puts src/ on PYTHONPATH (the package pins another torch, so it
#     is not pip-installed there);
#  2. `multitune doctor` (versions, whether the C++ ops built, flash-attn);
#  3. bench/check_ops.py: the fused ops on CUDA against their references, values and
#     gradients, bf16, on Llama-3.2-1B's head (hidden 2048, vocabulary 128256);
#  4. bench/peer_trl.py on the Llama-3.2-1B shape (random weights from its config, nothing is
#     downloaded), bf16: sdpa, and flash_attention_2 when flash_attn imports; throughput and
#     peak-allocated ratios against TRL's SFTTrainer, and MFU (PEAK_TFLOPS, H100/H200 dense
#     bf16: 989; FLOPs counted as bench/train_throughput.py states);
#  5. the suite's GPU-marked tests (pytest -m gpu).
# Each stage has its own time limit and a failure does not stop the next; the summary at the
# end lists every stage's status, and the script exits 1 if any failed. The limits add up to
# 8 minutes (45 + 150 + 45 + 2 x 100 + 40 s).
#
# The wheels (bench/gpu_wheels.sh): .whl/ (5 MB, what the GPU image lacks) and .whl-pyarrow/
# (53 MB; datasets needs pyarrow >= 24 and the image's version is not on record). pyarrow is
# installed only when the machine's is older. Both folders and the 1.4 MB tree fit the device
# tool's 64 MiB carry:  run(command="bash bench/gpu.sh", carry=[".whl", ".whl-pyarrow"])
#
# Usage (repository root):  bash bench/gpu.sh
# Dry run on CPU (tiny sizes, a 1-layer Llama-3.2-1B shape, every stage's code path):
#     DRY_RUN=1 PYTHON=.venv/bin/python bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
PYARROW_WHEELS=${PYARROW_WHEELS:-.whl-pyarrow}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DRY_RUN=${DRY_RUN:-0}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "$DRY_RUN" == 1 ]]; then
    DEVICE=cpu
    CHECK_OPS=(--device cpu --tokens 64 --hidden 128 --vocab 4096)
    PEER=(--device cpu --dtype bfloat16 --shape-layers 1 --steps 2 --micro-batch 4
        --max-examples 40 --threads 1)
    GPU_TESTS=(--collect-only -q)  # no CUDA here: only check that they collect
    LIMIT_SCALE=3                  # CPU is slower than the GPU the limits are set for
else
    DEVICE=cuda
    CHECK_OPS=(--device cuda)
    # Micro-batch 32 of the sample mix (about 110 tokens an example), 30 steps after the
    # process's first step compiles nothing (no torch.compile): seconds per side on an H100.
    PEER=(--device cuda --steps 30 --micro-batch 32 --max-seq-len 512)
    GPU_TESTS=(-q -x)
    LIMIT_SCALE=1
fi

declare -A STATUS
ORDER=()
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, record its status
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    echo
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    STATUS[$name]="rc $rc, $((SECONDS - started)) s"
    ORDER+=("$name")
}

install_missing_wheels() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl) missing=()
    for wheel in "${wheels[@]}"; do
        local dist
        dist=$(basename "$wheel" | cut -d- -f1)
        if ! "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' \
            "$dist" 2>/dev/null; then
            missing+=("$wheel")
        fi
    done
    # datasets needs pyarrow >= 24: install the carried one over an older or missing pyarrow.
    if ! "$PYTHON" -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' \
        2>/dev/null; then
        local arrow=("$PYARROW_WHEELS"/pyarrow-*.whl)
        if ((${#arrow[@]} == 0)); then
            echo "pyarrow here is missing or older than 24 (datasets needs >= 24), and no" \
                "$PYARROW_WHEELS/pyarrow-*.whl was carried: carry it (bench/gpu_wheels.sh)"
            return 1
        fi
        missing+=("${arrow[@]}")
    fi
    echo "${#wheels[@]} wheels in $WHEELS, ${#missing[@]} to install here"
    if ((${#missing[@]})); then
        "$PYTHON" -m pip install --quiet --no-deps --no-index "${missing[@]}"
    fi
    "$PYTHON" -c 'import datasets, trl, pydantic, gguf, rich, sacrebleu, pytest; print("imports ok")'
}

uptime
export PYTHON WHEELS PYARROW_WHEELS
export -f install_missing_wheels
stage wheels 45 bash -c install_missing_wheels
stage doctor 150 "$PYTHON" -m multitune doctor  # builds the C++ extension on first use
if [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
fi
stage check_ops 45 "$PYTHON" bench/check_ops.py "${CHECK_OPS[@]}"

attns=(sdpa)
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
    attns+=(flash_attention_2)
fi
for attn in "${attns[@]}"; do
    stage "peer_trl_$attn" 100 "$PYTHON" bench/peer_trl.py --model llama-3.2-1b-shape \
        --attn "$attn" --peak-tflops "$PEAK_TFLOPS" "${PEER[@]}"
done
stage gpu_tests 40 "$PYTHON" -m pytest -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" tests

echo
echo "== summary ($([[ "$DRY_RUN" == 1 ]] && echo "DRY RUN on CPU" || echo "$DEVICE"))"
failed=0
for name in "${ORDER[@]}"; do
    echo "$name: ${STATUS[$name]}"
    [[ "${STATUS[$name]}" == "rc 0,"* ]] || failed=1
done
uptime
exit $failed
