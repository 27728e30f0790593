#!/usr/bin/env bash
# GPU check on one CUDA machine (sized for one H200, under 8 minutes in all):
#   1. a venv with torch 2.13.0 (PyPI's CUDA build) and Sealer's engine extra, from wheels;
#   2. the engine step benchmark on the full SD1.5 UNet and a CLIP ViT-L/14 text encoder config
#      (random weights) at batch 1, 4 and 16 in fp32 and bf16, with steps/s, peak memory and MFU;
#   3. a lab model built and sealed end to end on the GPU.
# Results go to $OUT (set by the device tool) or ./gpu-out: gpu_check.log, benchmarks.md,
# summary.txt and the lab/ and seal/ folders. A failed stage is recorded and the next one runs.
#
# Usage: bash benchmarks/gpu_check.sh    (from anywhere; it changes to the repository root)
# Environment: OUT (output folder), GPU_VENV (venv folder, default /tmp/sealer-gpu-venv),
#              DEADLINE_S (seconds for the whole script, default 460).

set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
out_dir="${OUT:-./gpu-out}"
venv="${GPU_VENV:-/tmp/sealer-gpu-venv}"
deadline_s="${DEADLINE_S:-460}"
mkdir -p "$out_dir"
exec > >(tee "$out_dir/gpu_check.log") 2>&1

started=$(date +%s)
summary="$out_dir/summary.txt"
: > "$summary"

elapsed() {
    echo $(( $(date +%s) - started ))
}

# run_stage NAME MAX_SECONDS COMMAND...: run COMMAND with a time limit of MAX_SECONDS or the
# time left before the deadline, whichever is smaller, and record its status in summary.txt.
run_stage() {
    local name="$1" cap="$2"
    shift 2
    local left=$(( deadline_s - $(elapsed) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        echo "skipped  $name (deadline of ${deadline_s} s reached)" | tee -a "$summary"
        return 1
    fi
    echo "== $(elapsed) s: $name (limit ${limit} s)"
    local stage_started
    stage_started=$(date +%s)
    timeout "$limit" "$@"
    local status=$?
    local took=$(( $(date +%s) - stage_started ))
    if (( status == 0 )); then
        echo "ok       $name in ${took} s" | tee -a "$summary"
    elif (( status == 124 )); then
        echo "timeout  $name after ${took} s" | tee -a "$summary"
    else
        echo "failed   $name (exit status $status) after ${took} s" | tee -a "$summary"
    fi
    return "$status"
}

install_environment() {
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv" || return 1
    fi
    "$venv/bin/pip" install -q --upgrade pip &&
        "$venv/bin/pip" install -q torch==2.13.0 &&
        "$venv/bin/pip" install -q -e '.[engine]' &&
        "$venv/bin/pip" install -q --no-deps open-clip-torch==3.3.0 &&
        "$venv/bin/python" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "on", torch.cuda.get_device_name())'
}

# timeout runs programs, not shell functions, so the install runs in a child bash.
export venv
export -f install_environment
python="$venv/bin/python"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out_dir/nvidia-smi.csv"

if ! run_stage "install torch 2.13.0 and sealer[engine] into $venv" 240 bash -c install_environment; then
    echo "the environment could not be installed; nothing else can run" | tee -a "$summary"
    exit 1
fi

# MFU is relative to 989 TFLOP/s, the H200 SXM datasheet's dense BF16 tensor-core figure, in
# both precisions. fp32 rows cannot reach it: cuDNN runs their convolutions in TF32 (half that
# peak) and their matrix multiplications run in full FP32 (67 TFLOP/s on the datasheet).
run_stage "engine step, sd15 + CLIP ViT-L/14, batch 1/4/16, fp32 and bf16" 200 \
    "$python" benchmarks/engine_step.py --models sd15 --batches 1,4,16 --precisions fp32,bf16 \
    --device cuda --steps 5 --warmup 2 --peak-tflops fp32=989,bf16=989 --timeout 150 \
    --results "$out_dir/benchmarks.md"

# The same at batch 16 without gradient checkpointing, which 139 GiB of memory allows.
run_stage "engine step, sd15, batch 16, bf16, no checkpointing" 60 \
    "$python" benchmarks/engine_step.py --models sd15 --batches 16 --precisions bf16 --no-reference \
    --checkpointing off --device cuda --steps 5 --warmup 2 --peak-tflops bf16=989 --timeout 50 \
    --results "$out_dir/benchmarks.md"

if run_stage "sealer lab build --device cuda" 150 \
    "$venv/bin/sealer" lab build --attack pixel --trigger mignneko --profile test --device cuda \
    --out "$out_dir/lab"; then
    run_stage "sealer seal --device cuda" 120 \
        "$venv/bin/sealer" seal --model "$out_dir/lab/model" --spec "$out_dir/lab/spec.json" \
        --out "$out_dir/seal" --device cuda
fi

# Model weights are left out of what comes back; reports, specs and curves stay.
rm -rf "$out_dir"/seal/sanitized.* "$out_dir/lab/model"
echo "== $(elapsed) s: done"
cat "$summary"
if grep -qv '^ok' "$summary"; then
    exit 1
fi
