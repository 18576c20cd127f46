#!/usr/bin/env bash
# The GPU checks of issue 18 (item 5) in one bounded run, for a machine with one CUDA GPU:
#   1. `eas bench` on the LLaVA-1.5-7B geometry in bf16: 16/32 attention layers skipped as the main model,
#      12/32 and 16/32 in the sweep; each phase against its bound (prefill: FLOP ratio; decode: bytes read);
#   2. eas_tools/bench/peers.py with every server on the GPU;
#   3. the service tests with the served models (and the tests' references) on the GPU in bf16.
# Each step has its own time limit and a failing step does not stop the next. Results land in OUT_DIR.
#
#   bash eas_tools/scripts/gpu_acceptance.sh [OUT_DIR]      (default var/gpu)
set -u
out=${1:-var/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"

# The two 7B directories (~26 GB) and the sweep's third (~12 GB) are written where there is most room.
best="" best_free=0
for dir in /dev/shm "${TMPDIR:-/tmp}" "$PWD/var"; do
  mkdir -p "$dir" 2>/dev/null || continue
  free=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
  echo "free in $dir: $((free / 1048576)) GiB"
  if [ "${free:-0}" -gt "$best_free" ]; then best=$dir best_free=$free; fi
done
export TMPDIR=$best
sweep=(--sweep --sweep-fractions 0.375,0.5 --sweep-reps 5)
if [ "$best_free" -lt $((44 * 1048576)) ]; then
  echo "only $((best_free / 1048576)) GiB free: no sweep (the 12/32 model would not fit beside the others)"
  sweep=()
fi
echo "model directories under $TMPDIR"

echo "== 1. eas bench, llava-1.5-7b, bf16 =="
start=$SECONDS
timeout "${BENCH_TIMEOUT_S:-330}" "$py" -m eas_tools.cli bench --geometry llava-1.5-7b --device cuda --dtype bf16 \
  --skip-count 16 "${sweep[@]}" --reps 8 --batched-reps 3 --concurrency 1,4,16 --requests-per-level 16 \
  --no-progress --out "$out/bench7b"
echo "bench rc $? in $((SECONDS - start)) s"

echo "== 2. peers on the GPU =="
start=$SECONDS
timeout "${PEERS_TIMEOUT_S:-110}" "$py" -m eas_tools.bench.peers --device cuda --rounds 2 --duration 2 \
  --slices 2 --clients 1,4,16 --out "$out/peers-gpu.json"
echo "peers rc $? in $((SECONDS - start)) s"

echo "== 3. service tests on the GPU, bf16 =="
start=$SECONDS
EAS_TEST_DEVICE=cuda EAS_TEST_DTYPE=bf16 timeout "${TESTS_TIMEOUT_S:-170}" "$py" -m pytest tests/service -q \
  -p no:cacheprovider -rfE 2>&1 | tee "$out/service-tests.log" | tail -60
echo "service tests rc ${PIPESTATUS[0]} in $((SECONDS - start)) s"
