#!/usr/bin/env bash
# The device check of issue 22, in one call: the CUDA rows of scripts/bench.py (eager, --compile against
# plain eager and plain compiled, bf16 + channels_last) and a CUDA-against-CPU count check. Installs
# nothing: the machine's python3 has torch, onnxruntime, numpy. Logs and JSON go to $OUT (default /tmp/out).
#   bash scripts/gpu_check.sh            (from the repository root)
#   ONLY_EAGER22=1 bash scripts/gpu_check.sh   (issue 22's eager rows only: scripts/gpu_steady.py, ~6 min)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" PYTHONDONTWRITEBYTECODE=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
py=python3
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c "import torch, numpy, onnxruntime; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
reps="${REPS:-3}"
images="${IMAGES:-256}"
bench() {  # one case, its own process and time limit: an overrun loses one row
  echo "== $1"
  timeout "$2" $py scripts/bench.py --reps "$reps" --cuda-images "$images" --only "$1" --out "$OUT/$1.json" 2>&1 |
    grep -v Warning | tail -3
}
{
  if [ -n "${ONLY_STEADY:-}" ] || [ -n "${ONLY_EAGER22:-}" ]; then
    # issue 22's eager targets, ~6 min at most: each part its own process and time limit (full logs in $OUT)
    steady() {  # label, time limit, arguments
      echo "== $1"
      timeout "$2" $py scripts/gpu_steady.py "${@:3}" >"$OUT/steady-$1.log" 2>&1
      echo "(exit $?)"
      grep -E "^==|built|FAILED|ms/batch|vs |Error" "$OUT/steady-$1.log" | tail -20
    }
    steady fp32 150 --dtype fp32   # the eager arms are printed first, then the compiled ones
    steady bf16 130 --dtype bf16
    steady counts 45 --check
    exit 0
  fi
  if [ -n "${ONLY_COMPILE:-}" ]; then
    echo "== export diagnosis"; timeout 60 $py scripts/export_diag.py 2>&1 | grep -v Warning | tail -20
    bench cuda-compile 150; bench cuda-compile-vs-compiled 150
    echo "== counts"; timeout 120 $py scripts/gpu_counts.py 2>&1 | grep -v Warning | tail -4
    exit 0
  fi
  bench cuda-eager 100
  bench cuda-bf16 100
  echo "== counts: cuda eager / --compile / bf16 vs cpu"
  timeout 100 $py scripts/gpu_counts.py 2>&1 | grep -v Warning | tail -4
  bench cuda-compile 130
  bench cuda-compile-vs-compiled 130
} 2>&1 | tee "$OUT/bench.log"
