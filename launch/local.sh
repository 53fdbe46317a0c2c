#!/usr/bin/env bash
# One multi-process longvila-jax job on this machine: N processes on simulated CPU devices,
# joined through a local coordinator, to exercise the multi-host code paths without a cluster.
#
#   launch/local.sh N [longvila-jax args...]
#   launch/local.sh 2 train --config=my_stage.py --workdir=/tmp/run \
#       --config.parallel.node=2 --config.parallel.local=4     # 2 processes x 4 devices
#
# Process i runs `longvila-jax ARGS --coordinator=127.0.0.1:PORT --num_processes=N
# --process_id=i`, its output in $LOG_DIR/process_i.log. Environment:
#   DEVICES_PER_PROCESS  CPU devices each process simulates (default 4)
#   LOG_DIR              folder for the logs (default .)
#   LONGVILA             the command, split on spaces (default: this checkout's
#                        .venv/bin/longvila-jax)
#
# Exits 0 when every process does. When one fails, the others are stopped at once (they
# would otherwise wait in a collective for the dead one), its log's tail goes to stderr and
# the script exits with its status.
set -euo pipefail

if (($# < 1)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N [longvila-jax args...]" >&2
  exit 2
fi
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "launch/local.sh: needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi
num_processes=$1
shift
if [[ -n ${LONGVILA:-} ]]; then
  read -ra command <<<"$LONGVILA"
else
  command=("$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/longvila-jax")
fi
log_dir=${LOG_DIR:-.}
devices=${DEVICES_PER_PROCESS:-4}
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
mkdir -p "$log_dir"
# Free now; process 0 binds it a moment later (another program could take it in between).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')

declare -A process_of # pid -> process id, for the processes still running

stop_running() {
  for pid in "${!process_of[@]}"; do
    kill -- "-$pid" 2>/dev/null || true
  done
  wait # so that nothing is left running once this script has returned
}
trap stop_running EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Job control puts each process in its own process group, so stopping it also stops
# anything it started.
set -m
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags \
    "${command[@]}" "$@" --coordinator="127.0.0.1:$port" --num_processes="$num_processes" \
    --process_id="$i" >"$log_dir/process_$i.log" 2>&1 &
  process_of[$!]=$i
done
set +m

while ((${#process_of[@]})); do
  if wait -n -p pid; then
    unset "process_of[$pid]"
  else
    status=$?
    i=${process_of[$pid]}
    unset "process_of[$pid]"
    echo "launch/local.sh: process $i exited with status $status; stopping the others" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
    exit "$status"
  fi
done
