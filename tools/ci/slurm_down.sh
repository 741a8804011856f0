#!/usr/bin/env bash
# Stop the one-node Slurm that tools/ci/slurm_up.sh started under DIR: TERM each daemon by the
# pid in its pid file (never by name: other Slurm/munge instances on the machine are left
# alone), wait up to 15 s for each to exit, then KILL what is left.
set -uo pipefail
DIR=${1:?usage: slurm_down.sh DIR}

pid_of() {  # the live pid in pid file $1, or nothing
  local pid
  [ -s "$1" ] || return 0
  pid=$(tr -dc '0-9' < "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

stop_pidfiles() {  # TERM all at once, wait for all, KILL stragglers after 15 s
  local pids=() f pid
  for f in "$@"; do
    pid=$(pid_of "$f")
    [ -n "$pid" ] && pids+=("$pid") && kill -TERM "$pid" 2>/dev/null
  done
  for _ in $(seq 60); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.25
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm_down: pid $pid ignored TERM for 15 s: KILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  done
  return 0
}

# the Slurm daemons together, munged last (they authenticate with it while shutting down)
stop_pidfiles "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid"
stop_pidfiles "$DIR/munge/munged.pid"
