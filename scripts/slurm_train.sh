#!/usr/bin/env bash
# A Slurm job that survives preemption and its time limit: requeued, the same command resumes where it stopped.
#
#   sbatch scripts/slurm_train.sh configs/gpt2.py --out_dir=out-gpt2            # any train.py arguments
#   sbatch --nodes=4 scripts/slurm_train.sh configs/gpt2.py --out_dir=out-gpt2  # 4 nodes (out_dir on a shared disk)
#
# train.py runs with --init_from=auto: it resumes from out_dir/ckpt.pt when there is one, else starts a new run.
# Preempted (PreemptMode=REQUEUE), the job gets SIGTERM: every rank saves at one agreed step and exits, and Slurm puts
# the job back in the queue (--requeue). Near its time limit, Slurm sends this script USR1 (--signal): it stops the
# training the same way and requeues the job itself. scancel sends SIGTERM too: the run saves and the job ends.
#SBATCH --job-name=gpt-residual
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1         # one torchrun per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue                   # a preempted job goes back to the queue, and may be requeued by this script
#SBATCH --signal=B:USR1@300         # 5 minutes before the time limit: USR1 to this script (B: not to the steps)
#SBATCH --open-mode=append          # a requeued job appends to the same log
#SBATCH --output=%x-%j.log
set -u

GPUS=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s) x $GPUS GPU(s); rendezvous $HEAD"

requeue=0
stop_training() { kill -TERM "$step" 2>/dev/null; }  # srun forwards it to torchrun, torchrun to every rank
trap 'requeue=1; stop_training' USR1
trap stop_training TERM INT

# --init_from=auto last, so the requeued job resumes whatever the arguments say
srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS" \
    --rdzv_backend=c10d --rdzv_endpoint="$HEAD:${MASTER_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID" \
    train.py "$@" --init_from=auto &
step=$!
while true; do  # a trapped signal ends `wait` early: wait again until the step has ended
    wait "$step"
    status=$?
    kill -0 "$step" 2>/dev/null || break
done

if [ "$requeue" = 1 ]; then
    echo "time limit near: training stopped and saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
# torchrun exits 1 after a SIGTERM even when every rank saved and exited 0 (it re-raises the signal it got)
exit "$status"
