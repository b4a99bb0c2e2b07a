#!/bin/bash
# One node's part of slurm/train.sbatch, run by srun as one task per node: `accelerate launch` of
# this node's processes, as machine SLURM_PROCID of SLURM_NTASKS, meeting at the first node of the
# job. Everything comes from Slurm's environment, so the same line starts every node:
#   srun --ntasks-per-node=1 bash slurm/launch.sh <accelerate config> <training config> [key=value ...]
# Optional settings (environment):
#   PYTHON          the interpreter with the project installed (default: python3 on PATH)
#   PROCS_PER_NODE  processes per node (default: the job's GPUs on this node, else nvidia-smi's
#                   count, else 1: the CPU variant)
#   MAIN_ADDRESS    where the nodes meet (default: Slurm's address of the job's first node)
#   MAIN_PORT       the rendezvous port (default: derived from the job id)
#   STATUS_DIR      a directory where this task writes its exit code, in a file named by its rank
set -uo pipefail

usage="usage: srun bash slurm/launch.sh <accelerate config> <training config> [dotted.key=value ...]"
accelerate_config=${1:?$usage}
training_config=${2:?$usage}
shift 2
: "${SLURM_JOB_ID:?$usage (inside a Slurm job)}"
PYTHON=${PYTHON:-python3}

# train.sbatch's warning signal (--signal=USR1@...) goes to every process of the step. Its default
# action ends a process, so this shell and torchrun's agent must ignore it; the trainers inherit
# the ignored signal, then install their own handler (checkpoint, exit 75).
trap '' USR1

# One task per node: the task is the machine, its rank and the count are srun's.
machines=${SLURM_NTASKS:?$usage}
rank=${SLURM_PROCID:?$usage}

# Processes on this node: one per GPU the job holds here (SLURM_GPUS_ON_NODE, set for --gres=gpu
# and --gpus*), else every GPU nvidia-smi lists, else one (a CPU node).
gpus=0
if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    gpus=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
procs=${PROCS_PER_NODE:-$((gpus > 0 ? gpus : 1))}
# The task's CPUs shared among its processes (accelerate launch would give each one thread).
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
threads=$((cpus / procs > 0 ? cpus / procs : 1))

# The first node hosts rank 0 and the rendezvous. Slurm's own address for it (NodeAddr, which is
# the node's name unless the site configured another), so a node name need not resolve in DNS.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
address=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
MAIN_ADDRESS=${MAIN_ADDRESS:-${address:-$first}}
# A port per job: concurrent jobs sharing a first node do not collide (unless their ids differ
# by a multiple of 15000), and a requeued job, same id, finds the same one. 15000-29999 stays
# below Linux's ephemeral range (32768-60999), where outgoing connections take their ports.
MAIN_PORT=${MAIN_PORT:-$((15000 + SLURM_JOB_ID % 15000))}

launcher=(--config_file "$accelerate_config" --num_machines "$machines" --machine_rank "$rank"
          --num_processes $((machines * procs)) --main_process_ip "$MAIN_ADDRESS" --main_process_port "$MAIN_PORT"
          --num_cpu_threads_per_process "$threads")
# DeepSpeed's multi-node default (pdsh) would start every node from this one: srun already has.
if grep -q '^distributed_type: *DEEPSPEED' "$accelerate_config"; then
    launcher+=(--deepspeed_multinode_launcher standard)
fi

echo "$(date -Is) $(hostname): machine $rank of $machines, $procs process(es) x $threads thread(s)," \
     "meeting at $MAIN_ADDRESS:$MAIN_PORT (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0})" >&2
# slurm/accelerate_launch.py: accelerate launch, but exiting with the trainers' own code.
"$PYTHON" slurm/accelerate_launch.py "${launcher[@]}" pipeline/train.py --config "$training_config" "$@"
code=$?
echo "$(date -Is) $(hostname): machine $rank exited with $code" >&2
if [ -n "${STATUS_DIR:-}" ]; then
    echo "$code" > "$STATUS_DIR/$rank"
fi
exit "$code"
