#!/usr/bin/env bash
# Stop the dev cluster that slurm/dev-cluster.sh started: cancel its jobs, then stop every daemon by
# the PID in its pid file (never by name), newest first. Safe to run when nothing is up.
set -uo pipefail

DIR=${GENSYNTH_SLURM_DIR:-/tmp/gensynth-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf

say() { echo "stop-cluster: $*" >&2; }

pid_of() {  # NAME PIDFILE -> the PID, if that process is alive and is NAME
  local pid
  [ -s "$2" ] || return 1
  pid=$(head -n1 "$2" | tr -dc 0-9)
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] && echo "$pid"
}

stop() {  # NAME PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL
  local pid
  if ! pid=$(pid_of "$1" "$2"); then
    rm -f "$2"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 150); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then
    say "$1 ($pid) ignored SIGTERM for 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$2"
  say "stopped $1 ($pid)"
}

[ -d "$DIR/run" ] || { say "nothing to stop ($DIR/run does not exist)"; exit 0; }

# Jobs first, by job id, so no job step outlives its slurmd.
if pid_of slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    say "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 75); do
      [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

stop slurmd "$DIR/run/slurmd-n2.pid"
stop slurmd "$DIR/run/slurmd-n1.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop slurmdbd "$DIR/run/slurmdbd.pid"
stop mariadbd "$DIR/run/mariadb.pid"
stop munged "$DIR/run/munged.pid"
exit 0
