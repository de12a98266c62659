#!/usr/bin/env bash
# Multi-node LoRA training under SLURM: one `accelerate launch` per node, one process per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 scripts/slurm_train.sh configs/flux2-dev.yaml [key=value ...]
#
# Every node runs this script (srun below); node 0 hosts the rendezvous. Set GPUS_PER_NODE if
# SLURM does not report it, MASTER_PORT to move off 29500, DRY_RUN=1 to print the launch line only.
#SBATCH --job-name=fluxtune
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch --nodes=N --gpus-per-node=G scripts/slurm_train.sh CONFIG [key=value ...]" >&2
    exit 2
fi
: "${SLURM_JOB_NUM_NODES:?run this under sbatch/srun (SLURM_JOB_NUM_NODES is not set)}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
gpus="${gpus##*:}"  # "a100:8" -> "8"
if [ -z "$gpus" ]; then
    echo "cannot tell how many GPUs each node has; set GPUS_PER_NODE" >&2
    exit 2
fi
master="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
port="${MASTER_PORT:-29500}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Escaped so each node expands its own SLURM_NODEID inside srun.
launch="accelerate launch --config_file $here/configs/accelerate/ddp-multinode.yaml \
--num_machines $SLURM_JOB_NUM_NODES --num_processes $((SLURM_JOB_NUM_NODES * gpus)) \
--machine_rank \$SLURM_NODEID --main_process_ip $master --main_process_port $port \
-m fluxtune.cli train $(printf '%q ' "$@")"

if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "srun bash -c \"$launch\""
    exit 0
fi
# A preempted job gets SIGTERM: fluxtune checkpoints and exits 75; resubmit with train.resume=latest.
srun --kill-on-bad-exit=1 bash -c "$launch"
