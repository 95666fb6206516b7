#!/usr/bin/env bash
# The GPU suite for a lent H100/H200 (python 3.12 with torch preinstalled, no network).
#   bash benchmarks/gpu_suite.sh quick   build, CUDA tests, short benchmarks   (~3 min)
#   bash benchmarks/gpu_suite.sh full    long benchmarks, Fig. 2b, compiled HVP, training preset
#                                        (<= 9 min; PRESET_MAX_TIME caps the training, default 100 s)
# Writes JSON, PNG and logs under $OUT (default ./gpu_out) and prints a summary table last.
# Omniglot: IMAML_DATA if set, else .cache/gpu_data (an uncommitted copy carried to the machine,
# made by `make gpu-data`), else the package's embedded subset.
set -uo pipefail
stage="${1:-quick}"
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export OUT
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${IMAML_DATA:-}" ] && [ -d .cache/gpu_data ]; then export IMAML_DATA="$PWD/.cache/gpu_data"; fi
export IMAML_CACHE="${IMAML_CACHE:-$PWD/.cache/decoded}"
PY="${PY:-python3}"
status_file="$OUT/suite_status_$stage.txt"
: > "$status_file"

step() {  # step NAME TIMEOUT_S COMMAND... : runs, logs to $OUT/NAME.log, records ok/FAILED
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then echo "$name ok ${dt}s" | tee -a "$status_file"
  else echo "$name FAILED rc=$rc ${dt}s" | tee -a "$status_file"; tail -25 "$OUT/$name.log"; fi
  return 0
}

have() { [ -f "$1" ]; }

if [ "$stage" = quick ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  cat "$OUT/gpu.txt"
  "$PY" -c "import torch,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
  step build 400 "$PY" -m pip install --no-build-isolation --no-deps -e .
  "$PY" -c "import imaml_ext, json; print(json.dumps(imaml_ext.build_info()))" | tee "$OUT/build_info.json"
  # The CUDA cases of every op test, the CUDA-graph/no-sync tests, and the algorithms on GPU.
  step tests_cuda 240 "$PY" -m pytest python_tests -q -rs -k "cuda or graph" \
       --junitxml="$OUT/tests_cuda.xml" -p no:cacheprovider
  step bench_cg_quick 60 "$PY" benchmarks/bench_cg.py --device cuda --quick --out "$OUT/cg_cuda_quick.json"
  have benchmarks/bench_kernels.py && step bench_kernels_quick 60 "$PY" benchmarks/bench_kernels.py --device cuda --quick --out "$OUT/kernels_cuda_quick.json"
elif [ "$stage" = full ]; then
  step bench_cg 60 "$PY" benchmarks/bench_cg.py --device cuda --min-time 0.3 --out "$OUT/cg_cuda.json"
  have benchmarks/bench_kernels.py && step bench_kernels 70 "$PY" benchmarks/bench_kernels.py --device cuda --out "$OUT/kernels_cuda.json"
  have benchmarks/fig2b_compute_memory.py && step fig2b 60 "$PY" benchmarks/fig2b_compute_memory.py --device cuda --quick --out "$OUT/fig2b_cuda.json"
  have benchmarks/bench_meta_gradient.py && step bench_meta_gradient 60 "$PY" benchmarks/bench_meta_gradient.py --device cuda --quick --out "$OUT/meta_gradient_cuda.json"
  # Head-only (ANIL-style) against full adaptation, timing only, the paper's meta-batch.
  have benchmarks/bench_head_only.py && step head_only 120 "$PY" benchmarks/bench_head_only.py --device cuda --no-train --settings 5w1s:32,20w5s:32 --out "$OUT/head_only_cuda"
  # torch.compile's conv-net HVP against eager and one gradient (compilation timed apart; the
  # JSON is written after each setting, so a cut-short run keeps 5-way 1-shot).
  have benchmarks/bench_meta_gradient.py && step hvp_compiled 240 "$PY" benchmarks/bench_meta_gradient.py --device cuda --hvp-only --compile-hvp --hvp-repeats 5 --out "$OUT/hvp_compiled_cuda.json"
  have benchmarks/gpu_train_preset.sh && step train_preset 150 env MAX_TIME="${PRESET_MAX_TIME:-100}" bash benchmarks/gpu_train_preset.sh
else
  echo "usage: $0 quick|full" >&2; exit 2
fi

echo
echo "=== summary ($stage) on $(cat "$OUT/versions.txt" 2>/dev/null | tail -1)"
"$PY" benchmarks/gpu_summary.py "$OUT" || true
cat "$status_file"
