#!/usr/bin/env bash
# The project's whole GPU check, in one call on a lent GPU machine (see README, "GPU checks"):
# install blade into a throwaway folder (nothing is fetched), record the machine, run the tests
# marked `gpu` plus the Triton kernels' tests on CUDA while the default (CPU) suite runs against that
# machine's torch/triton/onnxruntime on its other cores, then the GPU benchmarks alone (timings are
# not shared with anything). Logs and results go to $OUT. Sized to fit one 600 s call.
# python3 -P (pytest, run from the root): the checkout's blade/ (without passes/ backends/ models/ mapped in) must
# not shadow the install; a script in bench/ has bench/ as its path, not the root, and must not take -P (it
# would lose _repo_path).
set -u
OUT=${OUT:-/tmp/blade-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/blade-site . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/blade-site
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, onnxruntime, onnx, onnxscript; print('torch', torch.__version__, 'triton', triton.__version__, 'onnxruntime', onnxruntime.__version__, 'onnx', onnx.__version__, 'onnxscript', onnxscript.__version__, torch.cuda.get_device_name())"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
echo "== default suite (CPU tests on this machine's libraries), in the background"
# test_packaging builds a wheel in an isolated environment, which needs the package index (none there)
PARALLEL=""; python3 -c "import xdist" 2>/dev/null && PARALLEL="-n ${SUITE_WORKERS:-8} --dist loadfile"
# PYTHONSAFEPATH: the tests' own `python -m blade` subprocesses, too, must not import the checkout's blade/
[ -n "${SKIP_SUITE:-}" ] || (CUDA_VISIBLE_DEVICES="" PYTHONSAFEPATH=1 timeout -s INT ${SUITE_S:-240} python3 -P -m pytest -q -p no:cacheprovider $PARALLEL \
  -k "not triton" --ignore tests/test_packaging.py --tb=short -rfE >"$OUT/suite.log" 2>&1; echo "suite rc=$?" >>"$OUT/suite.log") &
SUITE_PID=$!
echo "== gpu tests"
export BLADE_TRITON_AUTOTUNE=${BLADE_TRITON_AUTOTUNE:-0}  # autotuning every kernel test outlasts the device time
# the kernels compile on the CPU: a few workers share the GPU and cut the wall time (correctness only, no timing)
GPU_PARALLEL=""; [ -n "$PARALLEL" ] && GPU_PARALLEL="-n ${GPU_WORKERS:-4}"
timeout -s INT ${GPU_TEST_S:-180} python3 -P -m pytest -v -p no:cacheprovider $GPU_PARALLEL -m "gpu or not gpu" --tb=short -rfE --durations=15 \
  tests/backends/test_triton_attention.py tests/passes/test_attention.py tests/passes/test_fusion.py tests/test_peaks.py \
  tests/test_profile.py tests/backends/test_triton_backend.py tests/backends/test_triton_qgemm.py tests/test_selection.py \
  -k "gpu or triton or cuda" >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -25 "$OUT/gpu_tests.log"
wait $SUITE_PID; tail -25 "$OUT/suite.log"
if [ -n "${PEAKS:-}" ]; then  # bench/triton_gpu.py measures the peaks it needs itself
  echo "== machine peaks (measured vs datasheet)"
  timeout ${PEAKS_S:-120} python3 -P -c "import json, blade.backends; from blade.perf.peaks import measure; from blade.target import detect; print(json.dumps(measure(detect('cuda')).as_dict(), indent=1))" >"$OUT/peaks.json" 2>"$OUT/peaks.log"
  echo "peaks rc=$?"; head -c 1500 "$OUT/peaks.json"; tail -5 "$OUT/peaks.log"
fi
if [ -n "${ATTENTION_BENCH:-}" ]; then  # measured on an H100 and an H200 already (bench/results/attention_gpu*.md)
  echo "== attention benchmark"
  timeout ${BENCH_S:-300} python3 bench/attention_gpu.py --out "$OUT" ${BENCH_ARGS:-} >"$OUT/attention_gpu.log" 2>&1
  echo "bench rc=$?"; tail -30 "$OUT/attention_gpu.log"
fi
echo "== triton backend benchmark (eager, torch.compile, blade triton; base models, fp16)"
# autotuning on here (the tests above turn it off): untuned block sizes would understate blade
[ -n "${SKIP_BENCH:-}" ] || BLADE_TRITON_AUTOTUNE=1 timeout ${TRITON_BENCH_S:-300} python3 bench/triton_gpu.py --out "$OUT" ${TRITON_BENCH_ARGS:-} \
  >"$OUT/triton_gpu.log" 2>&1
echo "triton bench rc=$?"; tail -40 "$OUT/triton_gpu.log"
