#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one prepared run, for a session that is lent
# a GPU machine for a few minutes (plain torch there: no Ray; pydantic travels as wheels).
#
#   averaging_cuda  the outer-optimizer average against the plain one, tensors on the GPU,
#                   P = 2 processes over gloo (NCCL cannot put two ranks on one GPU)
#   averaging_cpu   the same on that machine's CPU cores (a quiet machine, unlike ours)
#   latency_gap     a small average after nothing, SGD steps, a sleep or busy work
#   costmodel       calibrate gloo on 127.0.0.1 without Ray (2 ms of computation before
#                   each timed average, and back to back), then validate the prediction
#                   against each trial's comm_time_s less its wait for the last learner
#   packed          benchmarks/gpu.py: the packed simulated backend, samples/s and memory
#   loop_cuda       the epoch loop against a bare CUDA loop (P = 1), fp32
#   loop_cuda_lm    the same with the language-model recipe (--recipe lm: bf16 autocast,
#                   clip 1.0, warm-up + cosine): its samples/s beside loop_cuda's are the
#                   bf16 against fp32 step times
#   gpu_emulation   issue 25's GPU check (benchmarks/gpu_emulation.py): NCCL at P = 1
#                   through python -m kavg_ray.train for K-AVG, DiLoCo and the simulated
#                   backend; P = 2 and P = 4 processes on the one GPU in groups registered
#                   for CUDA tensors only (cuda:gloo), training K-AVG, DiLoCo and Hier-AVG
#                   through the engine and loop, each average checked against the mean;
#                   an average's CUDA-event time beside synchronised host clocks. Exit 1
#                   on a failed check.
#
# Usage (repo root): OUT=DIR bash benchmarks/gpu_session.sh   (DIR gets log.txt + JSON)
# About 8 minutes on the H200 machine of 2026-11-30 (the step limits add up to more), plus
# gpu_emulation (not yet run on a GPU; 23 s on the 2-core CPU in smoke mode). ONLY=NAME
# runs one step (e.g. ONLY=gpu_emulation for a short device session). SMOKE=1 ONLY=
# gpu_emulation runs that step on the CPU in its smoke mode (tests/test_gpu_script.py).
# Wheels: python -m pip download --no-deps --only-binary=:all: --python-version 3.12 ...
#         -d .whl pydantic pydantic_core annotated-types typing-inspection typing_extensions
#         pyyaml    (kavg_ray.config reads YAML; the 2026-11-30 machine had PyYAML)
set -u
OUT=${OUT:-/tmp/kavg-gpu-session}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1

if [ -d .whl ] && ! $PY -c "import pydantic" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
date -u; nproc
if [ "${SMOKE:-}" != 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
$PY -c "import torch; print('torch', torch.__version__,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, go on whatever happens
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
    echo "=== $name: start $(date -u +%T), limit ${limit}s: $*"
    timeout "$limit" "$@"
    echo "=== $name: rc=$? at $(date -u +%T)"
}

# Issue 25 first: NCCL at P = 1, ranks in CUDA-only groups, event-timed averages.
step gpu_emulation 300 $PY benchmarks/gpu_emulation.py --device cuda --backend cuda:gloo \
    --P 2,4 --epochs 2 --reps 20 --time-model resnet18 --out "$OUT/gpu_emulation.json"
# Then what is still open (issue 18 on a quiet multi-core host): calibrations with and
# without the 2 ms gap, then trials whose wait for the last learner is split off.
step calibrate_gap2 60 $PY benchmarks/costmodel.py calibrate --P 2 --P 4 --repeats 8 \
    --gap-ms 2 --out "$OUT/profile_gap2.json"
step calibrate_gap0 60 $PY benchmarks/costmodel.py calibrate --P 2 --P 4 --repeats 8 \
    --gap-ms 0 --out "$OUT/profile_gap0.json"
step validate_gap2 150 $PY benchmarks/costmodel.py validate --profile "$OUT/profile_gap2.json" \
    --out "$OUT/validation_gap2.json"
step averaging_cuda 100 $PY benchmarks/averaging.py --device cuda --models resnet18 \
    --world-sizes 2 --reps 20 --out "$OUT/averaging_cuda.json"
step averaging_cpu 100 $PY benchmarks/averaging.py --device cpu --models resnet18 \
    --world-sizes 2,4 --reps 20 --out "$OUT/averaging_cpu.json"
step latency_gap 60 $PY benchmarks/latency_gap.py --P 2,4 --reps 400
# P = 128 with three K packed (384 VGG-16 learners) does not fit in 140 GiB: stop at 64.
step packed 150 $PY benchmarks/gpu.py --P 8,32,64 --out "$OUT/gpu.json"
step loop_cuda 90 $PY benchmarks/loop.py --device cuda --clock wall --reps 3 \
    --workloads digits-cnn,fake32-cnn,text-gpt
step loop_cuda_lm 90 $PY benchmarks/loop.py --device cuda --clock wall --reps 3 --recipe lm \
    --workloads digits-cnn,fake32-cnn,text-gpt
date -u
