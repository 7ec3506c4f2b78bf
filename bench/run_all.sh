#!/usr/bin/env bash
# All single-GPU benchmarks (see docs/performance.md). Writes under ${OUT:-out/bench}; each part has its own time
# limit (together 16 minutes: more than one 10-minute device call, so run the parts there) so that one slow part
# cannot eat the others; the JSON files are rewritten after every result row.
#   OUT=out/bench bash bench/run_all.sh      # COMPILE=1: also diffusers+torch.compile, if BUDGET_S leaves time
set -u
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
  timeout 150 python3 bench/layers.py --out "$OUT/layers.json" || echo "layers: exit $?"
  timeout 200 python3 bench/overhead.py --out "$OUT/overhead.json" || echo "overhead: exit $?"
  timeout 270 python3 bench/sampling.py --out "$OUT/sampling.json" || echo "sampling: exit $?"
  timeout 170 python3 bench/training.py --variants diffusers-eager,minisd-graph-cl-bf16,minisd-graph-cl-bf16-ckpt --out "$OUT/training.json" || echo "training: exit $?"
  timeout 60 python3 bench/groupnorm.py --out "$OUT/groupnorm.json" || echo "groupnorm: exit $?"
  timeout 90 python3 bench/first_call.py --out "$OUT/first_call.json" || echo "first_call: exit $?"
  timeout 100 python3 bench/layout.py --out "$OUT/layout.json" || echo "layout: exit $?"
  left=$(( ${BUDGET_S:-1080} - SECONDS ))
  echo "seconds used: $SECONDS, left for the optional compile row (COMPILE=1): $left"
  if [ "${COMPILE:-0}" = 1 ] && [ "$left" -gt 90 ]; then
    timeout $(( left - 15 )) python3 bench/sampling.py --dtypes fp16 --batches 1 --sections pipeline,compile --out "$OUT/compile.json" \
      || echo "compile: exit $?"
  fi
} 2>&1 | grep --line-buffered -v "^\[transformers\]\|There are modules in" | tee "$OUT/log.txt"
