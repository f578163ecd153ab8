#!/usr/bin/env bash
# The checks that need an accelerator, for whoever has one (CI and the project's machines have none).
#
# Run from the repository root, after `make .venv/.installed` (a CUDA build of torch in the venv):
#     bash bench/gpu_check.sh            # about 8 minutes on one H100/H200-class GPU
#     DEVICE=cuda:1 bash bench/gpu_check.sh
#
# 1. The family x method matrix (tests/test_matrix.py) on the device in bfloat16: every method on
#    every family's tiny model edits, keeps its scores finite, and restores every weight bit for bit.
# 2. The device's pre-edit scores against the CPU's float32 ones, per family: each probe's NLL within
#    5% of it (plus 0.05 nats) (DEVICE_NLL_TOLERANCE in tests/test_matrix.py).
# 3. bench/scale.py on the device in bfloat16: every method once on LLaVA-1.5-7B, Qwen2.5-VL-7B and
#    BLIP-2 OPT-2.7B at their real width (2 and 4 decoder layers), projected to full depth.
# Exit status: non-zero when any check fails; the scale table is printed whatever it shows.
set -euo pipefail

DEVICE="${DEVICE:-cuda}"
PY="${PY:-.venv/bin/python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script checks one')"

echo "== 1-2. method matrix and CPU agreement on $DEVICE, bfloat16"
MMKE_TEST_DEVICE="$DEVICE" MMKE_TEST_DTYPE=bfloat16 timeout 300 \
    "$PY" -m pytest tests/test_matrix.py -q -p no:cacheprovider \
    -k "test_method_edits_and_restores_on_family or test_device_scores_agree_with_the_cpu"

echo "== 3. real widths on $DEVICE, bfloat16"
timeout 240 "$PY" bench/scale.py --device "$DEVICE" --dtypes bfloat16 --depths 2,4 \
    --models llava-1.5-7b,qwen2.5-vl-7b,blip2-opt-2.7b
