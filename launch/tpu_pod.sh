#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same `python -m brorl_jax.train` on
# every TPU VM worker, through `gcloud compute tpus tpu-vm ssh --worker=all`.
# jax.distributed finds the workers itself (TPU metadata), so no coordinator
# is given; the launcher only forces `mesh.distributed=on`.
#
# Usage (from the repository root, on a machine with gcloud configured):
#   TPU=name ZONE=zone launch/tpu_pod.sh --config C --workdir W \
#       [--config.key=value ...]
#
#   W must be a directory every worker sees (a Filestore/NFS mount, or a
#   gcsfuse mount of a bucket): process 0 writes metrics, the tokenizer and
#   the model config there, every process writes its checkpoint shards.
#
# Environment:
#   TPU, ZONE            the TPU VM (slice) name and its zone (required).
#   PROJECT              gcloud project (default: gcloud's).
#   BRORL_REMOTE_DIR     where the code lives on the workers
#                        (default: ~/brorl-jax).
#   BRORL_SETUP          1 (default): copy this checkout to every worker and
#                        `pip install -e '.[tpu]'` into a venv there
#                        (BRORL_REMOTE_DIR/.venv) first; 0: reuse it.
#   BRORL_LOG            per-worker log file on the workers
#                        (default: BRORL_REMOTE_DIR/train.log); worker 0's
#                        output also streams here.
#
# Worked example: the BroRL arm on a v5p-64 slice (32 chips = 32 JAX
# devices; the config's `:v5p64` sets mesh (4, 8, 1) and 4,096 decode slots):
#   python -m brorl_jax.train --config configs/brorl_qwen2_1p5b.py:v5p64 \
#       --dry_run --dry_run_topology=v5p:4x4x2
#   TPU=brorl-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/brorl_qwen2_1p5b.py:v5p64 --workdir /mnt/shared/runs/brorl \
#       --config.init.path=/mnt/shared/models/Nemotron-Research-Reasoning-Qwen-1.5B \
#       --config.data.train_files="('/mnt/shared/data/math.jsonl',)"
#   # Resume: run it again (BRORL_SETUP=0 skips the copy and install).
#   # Preemption: the workers get SIGTERM, agree, save the last completed
#   # step and exit 0. A worker that dies makes the others exit non-zero
#   # within mesh.heartbeat_timeout_s.
set -euo pipefail

if [[ $# -eq 0 || -z "${TPU:-}" || -z "${ZONE:-}" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

remote=${BRORL_REMOTE_DIR:-'~/brorl-jax'}
log=${BRORL_LOG:-$remote/train.log}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("$TPU" --zone "$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && where+=(--project "$PROJECT")

if [[ "${BRORL_SETUP:-1}" == 1 ]]; then
  repo=$(git rev-parse --show-toplevel)
  tarball=$(mktemp -t brorl-jax.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  # Tracked and untracked-but-not-ignored files: what the checkout needs.
  (cd "$repo" && git ls-files -co --exclude-standard -z |
     tar --null -T - -czf "$tarball")
  "${gcloud_tpu[@]}" scp "$tarball" "${where[0]}:/tmp/brorl-jax.tar.gz" \
      "${where[@]:1}"
  "${gcloud_tpu[@]}" ssh "${where[@]}" --command="set -e
    mkdir -p $remote && tar -xzf /tmp/brorl-jax.tar.gz -C $remote
    cd $remote && python3 -m venv .venv && . .venv/bin/activate
    pip install -q -U pip && pip install -q -e '.[tpu]'"
fi

args=$(printf '%q ' "$@" "--config.mesh.distributed=on")
# Worker 0 streams its output; the others write only their log file.
"${gcloud_tpu[@]}" ssh "${where[@]}" --command="cd $remote &&
  . .venv/bin/activate &&
  if [ \"\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)\" = 0 ]; then
    python -m brorl_jax.train $args 2>&1 | tee $log; exit \${PIPESTATUS[0]}
  else
    python -m brorl_jax.train $args > $log 2>&1
  fi"
