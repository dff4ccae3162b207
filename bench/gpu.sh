#!/usr/bin/env bash
# The plain stack vs multitune on a lent GPU (prepared for an H200; not yet run, no GPU was lent).
#
# Same comparison as on CPU (bench/train_throughput.py: per-batch padding + full-vocabulary
# float32 logits + the usual cross-entropy, against packing + the fused loss op), on a
# Llama-3.2-1B-shaped model built from its config with random weights (nothing is downloaded),
# packed rows of 2048 tokens, bf16, the three-task demo mix. Runs sdpa, and flash-attention 2
# when it is installed. Reports useful tokens/s, peak allocated GPU memory and MFU.
#
# MFU counts the FLOPs a LoRA step needs per useful token (see bench/train_throughput.py): the
# frozen linear layers forward plus activation gradients (4 x parameters), attention forward and
# backward (12 x layers x hidden x mean causal context), and the vocabulary projection for answer
# tokens only. Peak: H200 dense bf16 989 TFLOP/s (override with PEAK_TFLOPS).
#
# Usage: bash bench/gpu.sh   (from the repository root, with the package's venv active or
# PYTHON pointing at its python; about 5 minutes, most of it building the C++ ops and models)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
MICRO_BATCH=${MICRO_BATCH:-64}
STEPS=${STEPS:-10}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" -m multitune doctor
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

attns=(sdpa)
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
    attns+=(flash_attention_2)
fi
for attn in "${attns[@]}"; do
    echo "== attention: $attn"
    "$PYTHON" bench/train_throughput.py --model llama-3.2-1b-shape --device cuda --dtype bfloat16 \
        --attn "$attn" --max-seq-len 2048 --micro-batch "$MICRO_BATCH" --steps "$STEPS" \
        --warmup 3 --peak-tflops "$PEAK_TFLOPS"
done
