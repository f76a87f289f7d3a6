#!/usr/bin/env bash
# The whole GPU suite in one device call: build the CUTLASS kernels, run the GPU tests, run the GPU benchmarks.
# On the device machine (see ../shared/device/README.md): carry .whl (nvidia-cutlass, ninja, pulp, pytest, ...) and
#   bash bench/gpu_suite.sh [tests] [kernels] [e2e]   # default: all; results to bench/results/ (and $OUT)
# Builds are cached in $MPQ_CACHE_DIR (default .devcache/ here): carry it to skip the build on a later call.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${*:-tests kernels e2e}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/mpq-pip.log 2>&1 || { cat /tmp/mpq-pip.log; exit 1; }
export MPQ_CACHE_DIR=${MPQ_CACHE_DIR:-$PWD/.devcache} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/mpq-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv

# The extensions build at once (and each one's translation units in parallel); the logs keep the compiler's errors.
build() {  # build NAME PYTHON-CALL (in mpq.kernels)
  python3 -c "import logging; logging.basicConfig(level=logging.DEBUG)
from mpq.kernels import cutlass_w8a8, cutlass_w4a16; $2" >"$out/build_$1.log" 2>&1
  local rc=$?
  echo "build $1: rc=$rc ($(tail -c 300 "$out/build_$1.log" | tr '\n' ' '))"
  [ $rc -eq 0 ] && touch "$out/.built_$1"
}
start=$SECONDS
rm -f "$out"/.built_*
build w8a8 "cutlass_w8a8.ops()" & build w8a8_sm80 "cutlass_w8a8.ops('sm80')" &
build w4a16 "cutlass_w4a16.ops()" & build w4a16_decode "cutlass_w4a16.decode_ops()" & wait
echo "builds took $((SECONDS - start)) s"
for ext in w8a8 w8a8_sm80 w4a16 w4a16_decode; do
  [ -e "$out/.built_$ext" ] || { echo "the $ext build failed: see build_$ext.log"; exit 1; }
done
rm -f "$out"/.built_*
tar -C "$MPQ_CACHE_DIR" -czf "$out/kernels_cache.tgz" --exclude='*.o' --exclude='*.ninja*' kernels 2>/dev/null

for step in $steps; do
  start=$SECONDS
  case $step in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cutlass.py tests/test_fp8.py \
             tests/test_gpu_profiling.py >"$out/gpu_tests.log" 2>&1; tail -25 "$out/gpu_tests.log" ;;
    kernels) python3 bench/gpu_kernels.py --all-configs && cp bench/results/gpu_kernels.json "$out"/ ;;
    e2e) python3 bench/gpu_e2e.py --blocks 4 && cp bench/results/gpu_e2e.json "$out"/ ;;
    *) echo "unknown step $step (tests, kernels, e2e)"; exit 2 ;;
  esac
  echo "step $step took $((SECONDS - start)) s"
done
