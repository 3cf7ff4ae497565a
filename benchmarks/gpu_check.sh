#!/usr/bin/env bash
# The GPU check, on a machine with one NVIDIA GPU (no network needed; pydensecrf2 optional): builds
# primaps_fast in place for this GPU only, runs the tests on the GPU, then times every stage side by side
# (benchmarks/gpu_check.py). OUT_DIR gets build.log, tests.log, bench.log, gpu_report.md, gpu_report.json.
# Exits non-zero when the build, a test or an agreement check fails. Kept under 8 minutes: the tests stop
# after GPU_CHECK_TEST_S seconds (default 240) and the slow references get the time left.
#   benchmarks/gpu_check.sh OUT_DIR             on the GPU machine
#   benchmarks/gpu_check.sh OUT_DIR --prebuilt  the same, with the modules already built in place for this
#                                               Python (built elsewhere with PRIMAPS_FAST_CUDA_ARCH set to
#                                               this GPU's); it builds only when they do not import
#   benchmarks/gpu_check.sh OUT_DIR --dry-run   without a GPU: CPU build, Triton interpreted, tiny shapes,
#                                               the op tests of the CUDA work only, no CUDA column
# GPU_CHECK_TESTS (paths, space-separated) replaces the tests run (default: all of tests/ on the GPU, the
# op tests of the CUDA work in a dry run);
# GPU_CHECK_S (default 420) is the time after which the slow references are skipped.
set -uo pipefail
mode=${2:-}
if [ $# -lt 1 ] || [ $# -gt 2 ] || { [ -n "$mode" ] && [ "$mode" != --dry-run ] && [ "$mode" != --prebuilt ]; }; then
  echo "usage: $0 OUT_DIR [--dry-run | --prebuilt]" >&2
  exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd)
dry=$([ "$mode" = --dry-run ] && echo --dry-run || true)
test_s=${GPU_CHECK_TEST_S:-240}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
jobs=$(nproc 2>/dev/null || echo 4)
start=$(date +%s)
status=0

# 1. Build in place: on a GPU, the CUDA module for this GPU's compute capability only.
if [ "$dry" = --dry-run ]; then
  export PRIMAPS_FAST_CUDA=0
else
  unset TRITON_INTERPRET
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  [ -n "$arch" ] || arch=$($py -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  export PRIMAPS_FAST_CUDA=1 PRIMAPS_FAST_CUDA_ARCH="$arch"
  export PRIMAPS_FAST_NVCC_VERSION="$("$nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo '?')"
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null), compute capability $arch"
fi
t0=$(date +%s)
if [ "$mode" = --prebuilt ] && $py -c "import primaps_fast._C, primaps_fast._C_cuda" > "$out/build.log" 2>&1; then
  echo "prebuilt modules import: not rebuilt" >> "$out/build.log"
elif ! $py setup.py build_ext --inplace --force -j "$jobs" >> "$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "gpu_check: the build failed (log: $out/build.log)"
  exit 1
fi
build_s="$(( $(date +%s) - t0 )) s"
grep -q "not rebuilt" "$out/build.log" && build_s="none (prebuilt modules)"
echo "build: $build_s"

# 2. Tests: on the GPU every test (or GPU_CHECK_TESTS), Triton compiled for the GPU
#    (conftest.py: PRIMAPS_FAST_TEST_DEVICE=cuda).
if [ "$dry" = --dry-run ]; then
  ops="tests/test_cuda_extension.py tests/test_median_filter.py tests/test_assign_pseudo_labels.py"
  read -r -a tests <<< "${GPU_CHECK_TESTS:-$ops tests/test_focal_loss.py tests/test_pseudo_labels.py}"
  parallel=()
else
  export PRIMAPS_FAST_TEST_DEVICE=cuda
  read -r -a tests <<< "${GPU_CHECK_TESTS:-tests}"
  parallel=()
  if $py -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
fi
OMP_NUM_THREADS=$([ ${#parallel[@]} -gt 0 ] && echo 2 || echo "${OMP_NUM_THREADS:-$jobs}") \
  timeout "$test_s" $py -m pytest "${tests[@]}" -q -rs -p no:cacheprovider "${parallel[@]}" > "$out/tests.log" 2>&1
rc=$?
summary=$(grep -E "passed|failed|error" "$out/tests.log" | tail -n 1)
[ $rc -eq 124 ] && summary="stopped after $test_s s: $summary"
[ $rc -ne 0 ] && status=1
echo "tests: ${summary:-no summary (see $out/tests.log)}"
unset PRIMAPS_FAST_TEST_DEVICE

# 3-4. Timings side by side after agreement checks; the report.
budget=$(( ${GPU_CHECK_S:-420} - ($(date +%s) - start) ))
$py benchmarks/gpu_check.py "$out" ${dry:+--dry-run} --budget-s "$(( budget > 30 ? budget : 30 ))" \
  --build-seconds "$build_s" --tests-summary "${summary:-see tests.log}" 2>&1 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1
echo "gpu_check: $(( $(date +%s) - start )) s, $([ $status -eq 0 ] && echo passed || echo FAILED); report: $out/gpu_report.md"
exit $status
