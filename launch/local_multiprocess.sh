#!/usr/bin/env bash
# Runs N processes of the trainer on this machine as the N hosts of one job
# (CPU devices by default): the multi-host code path without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh N [trainer args...]
#
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=/tmp/capture_demo_2x2
#   CAPTURE_DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh 2 --config=configs/demo.py \
#       --workdir=/tmp/capture_demo_2x4 --config.mesh.fsdp=2
#   CAPTURE_MAIN=tests/multidevice/sharding_two_process.py launch/local_multiprocess.sh 2 OUT_DIR
#
# Every process runs `$PYTHON $CAPTURE_MAIN "$@"` with
#   CAPTURE_COORDINATOR=localhost:$CAPTURE_PORT CAPTURE_NUM_PROCESSES=N CAPTURE_PROCESS_ID=i
# (read by capture_jax.training.distributed.initialize), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=$CAPTURE_DEVICES_PER_PROCESS.
#
# Environment (all optional):
#   CAPTURE_DEVICES_PER_PROCESS  simulated CPU devices per process (default 2)
#   CAPTURE_PORT                 coordinator port on localhost (default: a free port)
#   CAPTURE_MAIN                 what python runs (default: -m capture_jax.train)
#   PYTHON                       the interpreter (default: python)
#   JAX_PLATFORMS                default cpu (set it to '' to use local accelerators)
#   CAPTURE_KILL_AFTER           seconds the others get to stop after one fails (default 30)
#
# Output lines are prefixed with [pI]. SIGINT and SIGTERM are forwarded to every
# process as SIGTERM (what a preemption sends). Exits 0 when every process
# succeeds; otherwise the others are stopped and the first failure's exit
# status is returned.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; }

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  usage
  exit 2
fi
num_processes=$1
shift

PYTHON=${PYTHON:-python}
devices=${CAPTURE_DEVICES_PER_PROCESS:-2}
kill_after=${CAPTURE_KILL_AFTER:-30}
read -r -a main <<< "${CAPTURE_MAIN:--m capture_jax.train}"
port=${CAPTURE_PORT:-}
if [[ -z "$port" ]]; then
  port=$("$PYTHON" -c '
try:
  import portpicker
  print(portpicker.pick_unused_port())
except ImportError:
  import socket
  s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1]); s.close()')
fi

pids=()
forward() {
  local pid
  for pid in "${pids[@]}"; do
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done
}
trap forward INT TERM

echo "local_multiprocess: $num_processes processes x $devices devices, coordinator localhost:$port" >&2
for ((i = 0; i < num_processes; i++)); do
  CAPTURE_COORDINATOR="localhost:$port" CAPTURE_NUM_PROCESSES="$num_processes" CAPTURE_PROCESS_ID="$i" \
  JAX_PLATFORMS="${JAX_PLATFORMS-cpu}" \
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices" \
    "$PYTHON" "${main[@]}" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

# Reap the processes as they finish; the first failure stops the rest.
status=0
failed_at=0
while :; do
  alive=0
  for idx in "${!pids[@]}"; do
    pid=${pids[$idx]}
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      alive=1
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[idx]=''
    if (( rc != 0 && status == 0 )); then
      status=$rc
      failed_at=$SECONDS
      echo "local_multiprocess: process $idx exited with status $rc; stopping the others" >&2
      forward
    fi
  done
  (( alive )) || break
  if (( status != 0 && SECONDS - failed_at > kill_after )); then
    for pid in "${pids[@]}"; do
      [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  sleep 0.2
done
wait  # the output filters
exit "$status"
