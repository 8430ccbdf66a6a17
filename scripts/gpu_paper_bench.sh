#!/usr/bin/env bash
# A paper bench sharded over every GPU of this machine: one torchrun rank per GPU (NCCL), each sampling whole
# batches of the seeds one process would; rows, FID / KID and MACs are those of the one-process run.
# Resumable: rerun the same command after an interruption.
#   scripts/gpu_paper_bench.sh CONFIG OUT [cqpolicy bench flags...]
#   e.g. scripts/gpu_paper_bench.sh configs/fmnist-sd3-paper.yaml docs/results/paper-sd3 --only fora
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: scripts/gpu_paper_bench.sh CONFIG OUT [cqpolicy bench flags...]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
  echo "gpu_paper_bench: no CUDA GPU visible to torch; on CPU run: torchrun --nproc_per_node N -m cqpolicy bench" >&2
  exit 2
fi
echo "gpu_paper_bench: $gpus GPU(s), $(date -u +%FT%TZ)" >&2
start=$(date +%s)
.venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
  -m cqpolicy bench --config "$config" --out "$out" --device cuda "$@"
echo "gpu_paper_bench: done in $(( $(date +%s) - start )) s on $gpus GPU(s)" >&2
