#!/usr/bin/env bash
# K processes of one training run on this machine (jax.distributed over
# 127.0.0.1): the multi-host code path, on CPU or on local GPUs.
#
# Usage:
#   launch/local.sh K --config C --workdir W [--config.key=value ...]
#
#   Every argument after K goes to `python -m brorl_jax.train` unchanged; the
#   launcher appends --config.mesh.coordinator_address=127.0.0.1:PORT,
#   --config.mesh.num_processes=K and --config.mesh.process_id=i.
#
# Environment:
#   BRORL_CPU_DEVICES    CPU mode (the default): fake CPU devices per process
#                        (default 2), so the global mesh has K x this many.
#   BRORL_GPUS_PER_PROC  GPU mode: process i gets GPUs i*n .. i*n+n-1 through
#                        CUDA_VISIBLE_DEVICES (indices into an existing
#                        CUDA_VISIBLE_DEVICES list when one is set).
#   BRORL_PORT           coordinator port (default: a free one).
#   BRORL_LOG_DIR        per-process logs (default W/logs); process 0 is also
#                        echoed to this terminal.
#   BRORL_KILL_GRACE_S   after a process fails, how long the others get to
#                        exit before they are killed (default 30).
#   PYTHON               interpreter (default: python).
#
# Exit status: 0 when every process exits 0; otherwise the first failure's
# status, after the remaining processes are stopped. Ctrl-C / SIGTERM is
# forwarded to every process as SIGTERM (the loop saves its last completed
# step, all processes agreeing, and exits 0).
#
# Worked example (the CPU demo on 2 processes x 2 fake devices, a few
# minutes on 2 cores):
#   launch/local.sh 2 --config configs/demo_cpu.py --workdir runs/demo2 \
#       --config.total_steps=2 --config.warmstart.steps=20 \
#       --config.eval.max_prompts=16
#   # resume: run the same command again; watch: runs/demo2/metrics.jsonl,
#   # runs/demo2/logs/process_{0,1}.log
# On a machine with 8 GPUs, one process per GPU:
#   BRORL_GPUS_PER_PROC=1 launch/local.sh 8 --config C --workdir W
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && "$1" =~ ^[0-9]+$ && "$1" -ge 1 ]] || usage
K=$1
shift
PYTHON=${PYTHON:-python}

workdir=""
args=("$@")
for ((j = 0; j < ${#args[@]}; j++)); do
  case "${args[j]}" in
    --workdir=*) workdir=${args[j]#--workdir=} ;;
    --workdir) workdir=${args[j + 1]:-} ;;
  esac
done
[[ -n "$workdir" ]] || { echo "error: --workdir is required" >&2; exit 2; }
log_dir=${BRORL_LOG_DIR:-$workdir/logs}
mkdir -p "$log_dir"

port=${BRORL_PORT:-$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

if [[ -n "${BRORL_GPUS_PER_PROC:-}" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
  else
    n_gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    gpus=()
    for ((g = 0; g < n_gpus; g++)); do gpus+=("$g"); done
  fi
  need=$((K * BRORL_GPUS_PER_PROC))
  if ((${#gpus[@]} < need)); then
    echo "error: $K processes x $BRORL_GPUS_PER_PROC GPUs need $need GPUs;" \
         "${#gpus[@]} visible" >&2
    exit 2
  fi
else
  n_cpu=${BRORL_CPU_DEVICES:-2}
  # Drop a device count inherited from the caller (e.g. a test session).
  xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' \
              <<< "${XLA_FLAGS:-}")
fi

pids=()
stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'echo "launch/local.sh: forwarding SIGTERM to all processes" >&2;
      stop_all TERM' INT TERM

for ((i = 0; i < K; i++)); do
  cmd=("$PYTHON" -m brorl_jax.train "$@"
       "--config.mesh.coordinator_address=127.0.0.1:$port"
       "--config.mesh.num_processes=$K" "--config.mesh.process_id=$i")
  log="$log_dir/process_$i.log"
  if [[ -n "${BRORL_GPUS_PER_PROC:-}" ]]; then
    mine=("${gpus[@]:i * BRORL_GPUS_PER_PROC:BRORL_GPUS_PER_PROC}")
    env_cmd=(env "CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")")
  else
    env_cmd=(env JAX_PLATFORMS=cpu
             "XLA_FLAGS=$xla_flags --xla_force_host_platform_device_count=$n_cpu")
  fi
  if ((i == 0)); then
    "${env_cmd[@]}" "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${env_cmd[@]}" "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=($!)
done
echo "launch/local.sh: $K processes (pids ${pids[*]}), coordinator" \
     "127.0.0.1:$port, logs in $log_dir" >&2

# Wait for all; on the first failure stop the others (they could only wait
# for the dead process until JAX's heartbeat timeout ends them anyway).
status=0
remaining=$K
kill_at=""
declare -A done_
while ((remaining > 0)); do
  if [[ -n "$kill_at" ]] && ((SECONDS >= kill_at)); then
    stop_all KILL
    kill_at=""
  fi
  for ((i = 0; i < K; i++)); do
    pid=${pids[i]}
    [[ -n "${done_[$i]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    done_[$i]=1
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "launch/local.sh: process $i exited with status $rc; last lines" \
           "of $log_dir/process_$i.log:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2 || true
      stop_all TERM
      kill_at=$((SECONDS + ${BRORL_KILL_GRACE_S:-30}))
    fi
  done
  sleep 0.5
done
exit "$status"
