#!/usr/bin/env bash
# Runs the same command (the trainer by default) on every worker (host) of a
# Cloud TPU VM pod slice, one process per host; JAX finds the other workers
# from the TPU metadata (capture_jax.training.distributed, CAPTURE_CLUSTER=tpu).
#
# Usage:
#   TPU_NAME=capture-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=configs/capture_paper.py --workdir=gs://BUCKET/capture/paper
#   TPU_NAME=capture-v4-32 ZONE=us-central2-b PROJECT=my-project SYNC=1 SETUP='pip install -e .' \
#       launch/tpu_pod.sh --config=configs/capture_paper.py --workdir=gs://BUCKET/capture/paper \
#       --config.data.batch_size=4096 --config.mesh.fsdp=8
#   TPU_NAME=capture-v4-32 ZONE=us-central2-b MODULE=capture_jax.evaluate launch/tpu_pod.sh \
#       --config=configs/capture_paper.py --workdir=gs://BUCKET/capture/paper --split=dev
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required)
#   PROJECT          gcloud project (default: gcloud's)
#   REMOTE_DIR       the checkout on every worker, relative to the home directory (default capture_jax)
#   PYTHON           the interpreter on the workers (default python3)
#   MODULE           the command to run: capture_jax.train (default), capture_jax.export,
#                    capture_jax.evaluate, or capture_jax.instances (then the first argument
#                    is train or propose)
#   SETUP            a command run in REMOTE_DIR on every worker before training (e.g. 'pip install -e .')
#   WORKER           the workers to run on (default all; 0 for a one-host command such as
#                    MODULE=capture_jax.instances train, whose small model trains on one host)
#   SYNC=1           first copy this checkout (tracked and untracked, not ignored, files) to every worker
#   DRY_RUN=1        print the gcloud commands instead of running them
#
# The workdir must be storage that every worker reaches (gs://...): every
# worker writes its share of each checkpoint, and process 0 writes the logs,
# exports and reports. The input data (--config.data.*) is read from each
# worker's local disk or a gcsfuse mount, never from gs:// directly.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; }

if [[ -z "${TPU_NAME:-}" || -z "${ZONE:-}" || $# -eq 0 ]]; then
  usage
  exit 2
fi
REMOTE_DIR=${REMOTE_DIR:-capture_jax}
PYTHON=${PYTHON:-python3}
MODULE=${MODULE:-capture_jax.train}
gcloud_args=(compute tpus tpu-vm)
where=(--zone="$ZONE" --worker="${WORKER:-all}")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ "${SYNC:-0}" == 1 ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive=$(mktemp "${TMPDIR:-/tmp}/capture_jax.XXXXXX.tar.gz")
  trap 'rm -f "$archive"' EXIT
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -)
  run gcloud "${gcloud_args[@]}" scp "$archive" "$TPU_NAME:capture_jax.tar.gz" "${where[@]}"
  run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" "${where[@]}" \
    --command="mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -xzf capture_jax.tar.gz -C $(printf '%q' "$REMOTE_DIR")"
fi

# The same command on every worker; arguments are quoted for the remote shell.
remote="cd $(printf '%q' "$REMOTE_DIR")"
[[ -n "${SETUP:-}" ]] && remote+=" && $SETUP"
remote+=" && CAPTURE_CLUSTER=tpu $(printf '%q' "$PYTHON") -m $(printf '%q' "$MODULE")$(printf ' %q' "$@")"
run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$remote"
