#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for trying gensynth's SLURM path and for its tests:
# munge, MariaDB + slurmdbd (accounting: submitit polls sacct), slurmctld and two slurmd for the
# logical nodes n1 and n2 (each with its own port), all on 127.0.0.1.
#
#   sudo slurm/dev-cluster.sh            # install (Debian 12 packages) if missing, configure, start, wait
#   sudo slurm/dev-cluster.sh --status   # exit 0 when the cluster is up, 1 when it is not
#   sudo slurm/stop-cluster.sh           # stop every daemon by the PID in its pid file
#
# Idempotent: a second run while the cluster is up checks it and returns in a second or two.
# Everything lives under $GENSYNTH_SLURM_DIR (default /tmp/gensynth-slurm): configs, state, logs,
# pid files, the munge key and the MariaDB data. Ports: $GENSYNTH_SLURM_PORT_BASE (default 7810)
# + 1 and + 2 (slurmd n1, n2), + 6 (MariaDB), + 7 (slurmctld), + 9 (slurmdbd).
# Why the settings are what they are: docs/slurm-dev-cluster.md (cred_expire, 30 s limit checks).
set -euo pipefail

DIR=${GENSYNTH_SLURM_DIR:-/tmp/gensynth-slurm}
BASE=${GENSYNTH_SLURM_PORT_BASE:-7810}
CLUSTER=gensynth
ACCOUNT=gensynth
NODES=(n1 n2)
PORT_N1=$((BASE + 1)) PORT_N2=$((BASE + 2)) PORT_DB=$((BASE + 6)) PORT_CTLD=$((BASE + 7)) PORT_DBD=$((BASE + 9))
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

say() { echo "dev-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# alive NAME PIDFILE: the pid file names a running process whose command is NAME (guards against reused PIDs)
alive() {
  local pid
  [ -s "$2" ] || return 1
  pid=$(head -n1 "$2" | tr -dc 0-9)
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}

nodes_ready() {  # both nodes registered and usable (idle, or running jobs)
  local states
  states=$(timeout 10 sinfo -h -N -o "%N %t" 2>/dev/null | sort -u) || return 1
  for n in "${NODES[@]}"; do
    echo "$states" | grep -Eq "^$n (idle|mix|alloc|comp)\*?$" || return 1
  done
}

all_up() {
  alive munged "$DIR/run/munged.pid" && alive mariadbd "$DIR/run/mariadb.pid" &&
    alive slurmdbd "$DIR/run/slurmdbd.pid" && alive slurmctld "$DIR/run/slurmctld.pid" &&
    alive slurmd "$DIR/run/slurmd-n1.pid" && alive slurmd "$DIR/run/slurmd-n2.pid" && nodes_ready
}

usage_text() {
  local env_line=""
  [ "$(readlink -f /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] || env_line="  export SLURM_CONF=$CONF"$'\n'
  cat <<EOF
dev-cluster: up. Cluster '$CLUSTER', partition debug, nodes n1 n2 (2 CPUs each), account '$ACCOUNT'.
${env_line}  sinfo                                    # both nodes idle
  python slurm/train.py configs/gan_fashion.yaml --nodes 2 --tasks-per-node 1 --partition debug --wait
  gensynth inspect runs/<name>             # job ids, requeues, last checkpoint
  sudo slurm/stop-cluster.sh               # stop every daemon (by PID)
Logs: $DIR/log/   state: $DIR/state/
EOF
}

if [ "${1:-}" = "--status" ]; then
  all_up
  exit $?
fi
[ $# -eq 0 ] || die "unknown argument $1 (use no argument, or --status)"

if all_up; then
  usage_text
  exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (sudo slurm/dev-cluster.sh): slurmd must start jobs as their users"

# ---------------------------------------------------------------------------------------- packages
need=()
for cmd in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db; do
  command -v "$cmd" >/dev/null || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get: install SLURM 22.05+, munge and MariaDB"
  say "installing slurmctld slurmd slurmdbd slurm-client munge mariadb-server (missing: ${need[*]})"
  apt-get update -qq
  # apt's 'policy-rc.d denied execution of start' is expected: we start the daemons ourselves below
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurmdbd slurm-client munge mariadb-server >/dev/null
fi

# ---------------------------------------------------------------------------------------- layout
HOST=$(hostname -s)
CPUS=$(nproc); [ "$CPUS" -ge 2 ] || CPUS=2
mkdir -p "$DIR"/{etc,run,log,state,spool,munge,mysql,mysqld}
chmod 755 "$DIR"
chown munge:munge "$DIR/munge"; chmod 755 "$DIR/munge"  # munged needs a+x on its socket dir; the key is 600
chown mysql:mysql "$DIR/mysql" "$DIR/mysqld"

write_if_changed() {  # FILE MODE: stdin -> FILE, only when the content differs (keeps mtimes stable)
  local tmp; tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"; chmod "$2" "$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

[ -s "$DIR/etc/db-password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$DIR/etc/db-password")
DB_PASSWORD=$(cat "$DIR/etc/db-password")

write_if_changed "$CONF" 644 <<EOF
# written by slurm/dev-cluster.sh: a one-host dev cluster with two logical nodes
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: the default 120 s holds every requeued job back for 2 minutes
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=0,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
Waittime=0
InactiveLimit=0
MinJobAge=300
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$PORT_DBD
# with munge, this names the munge socket for connections to slurmdbd (AuthInfo does not reach those)
AccountingStoragePass=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORT_N1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORT_N2 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

write_if_changed "$DIR/etc/slurmdbd.conf" 600 <<EOF
# written by slurm/dev-cluster.sh (mode 600: it holds the local database password)
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF

# Client tools (sinfo, sbatch, submitit) find the config through /etc/slurm/slurm.conf, unless that
# belongs to a real cluster: then we leave it alone and say to export SLURM_CONF.
if [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
  mkdir -p /etc/slurm && ln -s "$CONF" /etc/slurm/slurm.conf
fi

wait_for() {  # SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) seconds=$1 what=$2; shift 2
  while [ $SECONDS -lt $deadline ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up in ${seconds} s; see $DIR/log/"
}

# ---------------------------------------------------------------------------------------- munge
if ! alive munged "$DIR/run/munged.pid"; then
  if [ ! -s "$DIR/munge/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  touch "$DIR/run/munged.pid" "$DIR/log/munged.log"; chown munge:munge "$DIR/run/munged.pid" "$DIR/log/munged.log"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for 10 munged sh -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
fi

# ---------------------------------------------------------------------------------------- MariaDB
DB_SOCKET=$DIR/mysqld/mysqld.sock
if ! alive mariadbd "$DIR/run/mariadb.pid"; then
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
  fi
  touch "$DIR/run/mariadb.pid" "$DIR/log/mariadb.log"; chown mysql:mysql "$DIR/run/mariadb.pid" "$DIR/log/mariadb.log"
  # innodb_lock_wait_timeout=900 is what slurmdbd asks for; a small buffer pool keeps it at ~100 MB
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DB_SOCKET" \
    --bind-address=127.0.0.1 --port="$PORT_DB" --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
    --skip-name-resolve --innodb-buffer-pool-size=32M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "SELECT 1"
  wait_for 10 "MariaDB's pid file" alive mariadbd "$DIR/run/mariadb.pid"
fi
mariadb --no-defaults --socket="$DB_SOCKET" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# ---------------------------------------------------------------------------------------- slurmdbd + accounting
if ! alive slurmdbd "$DIR/run/slurmdbd.pid"; then
  rm -f "$DIR/run/slurmdbd.pid"
  /usr/sbin/slurmdbd
  wait_for 30 slurmdbd alive slurmdbd "$DIR/run/slurmdbd.pid"
fi
wait_for 30 "slurmdbd (sacctmgr)" sacctmgr -n list cluster
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
  sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="gensynth dev" Organization=gensynth >/dev/null
for user in root ${SUDO_USER:-}; do
  sacctmgr -n -P list user format=user | grep -qx "$user" ||
    sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
done

# ---------------------------------------------------------------------------------------- slurmctld + slurmd
if ! alive slurmctld "$DIR/run/slurmctld.pid"; then
  rm -f "$DIR/run/slurmctld.pid"
  /usr/sbin/slurmctld
  wait_for 30 slurmctld alive slurmctld "$DIR/run/slurmctld.pid"
  wait_for 30 "slurmctld (scontrol ping)" sh -c "scontrol ping | grep -q UP"
fi
for n in "${NODES[@]}"; do
  if ! alive slurmd "$DIR/run/slurmd-$n.pid"; then
    rm -f "$DIR/run/slurmd-$n.pid"
    mkdir -p "$DIR/spool/$n"
    /usr/sbin/slurmd -N "$n"
    wait_for 30 "slurmd $n" alive slurmd "$DIR/run/slurmd-$n.pid"
  fi
done

for _ in $(seq 150); do nodes_ready && break; sleep 0.2; done
if ! nodes_ready; then
  # a node left DOWN by an earlier unclean stop comes back with a resume
  scontrol update NodeName=n[1-2] State=RESUME >/dev/null 2>&1 || true
  wait_for 30 "nodes n1 and n2 (sinfo idle)" nodes_ready
fi
usage_text
