#!/usr/bin/env bash
# GPU check of the Triton block-copy kernels: correctness, then bandwidth against cudaMemcpy.
#
#   experiments/bench/gpu_check.sh            # from anywhere, on a machine with an NVIDIA GPU
#   PYTHON=/path/to/python experiments/bench/gpu_check.sh
#
# Needs a Python with a CUDA build of torch and with triton: on a GPU machine `make install`
# puts both in .venv (used by default), or name another interpreter with PYTHON.  Nothing is
# downloaded or written outside pytest's temporary files.  About 2-5 minutes on one GPU.
#
# 1. Correctness: tests/kernels, where the CUDA tests run the compiled Triton kernel with the
#    engine on the GPU and the pool in pinned host memory (zero-copy D2H/H2D) or on the GPU,
#    byte-exact against the naive per-block reference (bf16, fp16, fp32, fp8, uint8, odd head
#    dims, unsorted/repeated ids) and against the CPU fallback on a vLLM-sized batch; the rest
#    of the module (torch fallback, Triton under TRITON_INTERPRET=1) runs too.  Stops on failure.
# 2. Bandwidth: `python -m experiments bench copy --device cuda` for several shapes.  Gather is
#    D2H into the pinned pool, scatter H2D out of it, each against one contiguous pinned
#    cudaMemcpy (`copy_(..., non_blocking=True)`) of the same bytes, timed with CUDA events.
#    Target (issue 4): ratio >= 0.9.  The JSON line of each run is printed, then a summary.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
try:
    import triton
except ImportError:
    sys.exit("gpu_check: triton does not import")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}")
EOF
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current,memory.total --format=csv || true

echo "== 1. correctness =="
"$PY" -m pytest -q -p no:cacheprovider -rs tests/kernels

echo "== 2. bandwidth (last line of each run) =="
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for config in \
    "--block-size 16" \
    "--block-size 32" \
    "--block-size 16 --layout kv-first" \
    "--block-size 16 --dtype fp8" \
    "--block-size 16 --blocks 1024 --cache-blocks 4096" \
    "--block-size 16 --pool-slots 2048" \
    "--block-size 16 --blocks 16"; do
    echo "-- bench copy --device cuda $config"
    # shellcheck disable=SC2086
    "$PY" -m experiments bench copy --device cuda --iters 20 $config | tail -n 1 | tee -a "$results"
done

"$PY" - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
worst = min(row["ratio"] for row in rows)
print(f"summary: {len(rows)} runs, worst ratio {worst:.3f} (target >= 0.9): {'met' if worst >= 0.9 else 'NOT met'}")
EOF
