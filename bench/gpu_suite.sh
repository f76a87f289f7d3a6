#!/usr/bin/env bash
# The whole GPU suite in one device call: build the CUDA extensions, run the GPU tests, run the GPU benchmarks.
# On the device machine (see ../shared/device/README.md): carry .whl (nvidia-cutlass, pulp, ...) and
#   bash bench/gpu_suite.sh [sens] [tests] [kernels] [latacc] [e2e]   # default: tests kernels e2e; results to bench/results/ (and $OUT)
# sens (first, if at all) judges the estimators in the GPU kernels' option space on the CPU cores from the fifth on, in the
# background, while the GPU steps that follow run pinned to the first four cores.
# Builds are cached in $MPQ_CACHE_DIR (default .devcache/ here); the built libraries come back as
# $OUT/cache_*.tgz: unpack them into $MPQ_CACHE_DIR/kernels (carry it) to skip those builds on a later call.
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
mkdir -p "$out" "$MPQ_CACHE_DIR/kernels"
for t in "$MPQ_CACHE_DIR"/cache_*.tgz; do [ -e "$t" ] && tar -C "$MPQ_CACHE_DIR/kernels" -xzf "$t"; done
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv

# Every extension builds at once (and each one's translation units in parallel through ninja); builds.log keeps the
# compilers' messages.
build() {  # build NAME PYTHON-EXPRESSION (in mpq.kernels)
  python3 -c "import logging; logging.basicConfig(level=logging.DEBUG)
from mpq.kernels import cutlass_w8a8, cutlass_w4a16, cuda_lowbit, cuda_decode8; $2" >"/tmp/build_$1.log" 2>&1
  local rc=$?
  echo "build $1: rc=$rc ($(tail -c 300 "/tmp/build_$1.log" | tr '\n' ' '))"
  [ $rc -eq 0 ] && touch "/tmp/.built_$1"
}
start=$SECONDS
rm -f /tmp/.built_*
exts="w8a8 w8a8_sm80 w4a16 w4a16_decode lowbit decode8"
build w8a8 "cutlass_w8a8.ops()" & build w8a8_sm80 "cutlass_w8a8.ops('sm80')" &
build w4a16 "cutlass_w4a16.ops()" & build w4a16_decode "cutlass_w4a16.decode_ops()" &
build lowbit "cuda_lowbit.ops()" & build decode8 "cuda_decode8.ops()" & wait
echo "builds took $((SECONDS - start)) s"
for ext in $exts; do echo "=== $ext"; grep -E "error|warning: Registers|spill" "/tmp/build_$ext.log" | head -50; \
  tail -5 "/tmp/build_$ext.log"; done >"$out/builds.log"
failed=0
for ext in $exts; do [ -e "/tmp/.built_$ext" ] || { echo "the $ext build failed: see builds.log"; failed=1; }; done
# the built libraries, for a later call (two archives: one returned file is at most 16 MB)
(cd "$MPQ_CACHE_DIR/kernels" && tar -czf "$out/cache_cutlass.tgz" --exclude='*.o' --exclude='*.ninja*' \
  --exclude='.ninja*' mpq_cutlass_* 2>/dev/null; tar -czf "$out/cache_mpq.tgz" --exclude='*.o' --exclude='*.ninja*' \
  --exclude='.ninja*' mpq_w4a16_decode-* mpq_wq_decode-* mpq_w8_decode-* 2>/dev/null)
ls -la "$out"/cache_*.tgz
[ $failed -eq 0 ] || exit 1

# Programmatic dependent launch inside a CUDA graph: each call of a chain must see the previous call's output. If
# this fails, the decode kernels launch plainly for the rest of the run (MPQ_PDL=0) and the log says so.
if python3 - >/tmp/pdl_check.log 2>&1 <<'PY'
import torch
from mpq.kernels.cuda_lowbit import lowbit_decode, pack_lowbit, tile_scales
n = 4096
q = torch.randint(-7, 8, (n, n), device="cuda")
p, s = pack_lowbit(q, 4), tile_scales(torch.rand(n, n // 128, device="cuda") / 1000 + 1e-4, 128, n, n)
x = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
def chain(v, pdl):
    for _ in range(4):
        v = lowbit_decode(v, p, s, 4, n, 128, pdl=pdl)
    return v
expected = chain(x, False)
side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    chain(x, True)
torch.cuda.current_stream().wait_stream(side)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    out = chain(x, True)
for _ in range(5):
    g.replay(); torch.cuda.synchronize()
    assert torch.equal(out, expected), "a PDL chain read stale activations"
print("programmatic dependent launch: chained graph replays match")
PY
then
  cat /tmp/pdl_check.log
else
  echo "programmatic dependent launch failed its check ($(tail -c 300 /tmp/pdl_check.log | tr '\n' ' ')): MPQ_PDL=0"
  export MPQ_PDL=0
fi

sens_pid=
for step in $steps; do
  start=$SECONDS
  case $step in
    sens)  # fake-quant numerics run anywhere: the GPU space needs only the built kernels to list its options
      last=$(($(nproc) - 1))
      OMP_NUM_THREADS=$((last - 3)) timeout "${MPQ_SENS_TIMEOUT:-420}" taskset -c "4-$last" python3 bench/sensitivity.py --spaces cuda \
        ${MPQ_SENS_ARGS:---models digits-cnn char-lm --estimators fisher lrp entropy measured} --out sens_gpu \
        >"$out/sens.log" 2>&1 &
      sens_pid=$!
      taskset -pc 0-3 $$ >/dev/null ;;
    tests)  # one process per file: a kernel fault cannot take the other files' tests with it
      : >"$out/gpu_tests.log"
      for f in tests/test_gpu_lowbit.py tests/test_gpu_decode8.py tests/test_cutlass.py tests/test_fp8.py \
               tests/test_gpu_profiling.py; do
        echo "=== $f" >>"$out/gpu_tests.log"
        python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=300 -rfE "$f" >>"$out/gpu_tests.log" 2>&1
        echo "$f: $(tail -1 "$out/gpu_tests.log")"
      done ;;
    kernels) python3 bench/gpu_kernels.py --all-configs && cp bench/results/gpu_kernels.json "$out"/ ;;
    latacc) timeout "${MPQ_LATACC_TIMEOUT:-400}" python3 bench/latency_accuracy.py --device cuda --blocks 2 --configs 30 \
              --frontier 8 --random 14 --repeats 10 --folds 5 ${MPQ_LATACC_ARGS:---mode cuda cuda-graph --tokens 1 2048}; \
            cp bench/results/latency_accuracy_cuda*.json "$out"/ ;;
    e2e) timeout "${MPQ_E2E_TIMEOUT:-900}" python3 bench/gpu_e2e.py --blocks 4 && cp bench/results/gpu_e2e.json "$out"/ ;;
    *) echo "unknown step $step (tests, kernels, latacc, e2e)"; exit 2 ;;
  esac
  echo "step $step took $((SECONDS - start)) s"
done
if [ -n "$sens_pid" ]; then
  wait "$sens_pid"; echo "sens: rc=$? ($(tail -c 300 "$out/sens.log" | tr '\n' ' '))"
  cp bench/results/sens_gpu_*.json "$out"/ 2>/dev/null
fi
