#!/usr/bin/env bash
# A real single-machine Slurm cluster for tests and demos: munge, mariadb + slurmdbd (accounting,
# so sacct and submitit see cancelled jobs), slurmctld and N simulated slurmd nodes on this host.
#
#   slurm/local-cluster.sh start [N]   # as root, without systemd; installs the Debian packages
#   slurm/local-cluster.sh status
#   slurm/local-cluster.sh stop        # ends exactly the daemons that start started (pid files)
#
# It writes /etc/slurm/slurm.conf and slurmdbd.conf (the clients' default), keeps its pid files
# and logs in $STATE (default /tmp/rnnpipe-slurm), and is idempotent: start on a running cluster
# only waits for it. Measured on Debian 12: Slurm 22.05.8, about 20 s from nothing to idle nodes.
set -euo pipefail

STATE=${RNNPIPE_SLURM_STATE:-/tmp/rnnpipe-slurm}
NODES=${2:-${RNNPIPE_SLURM_NODES:-2}}
CPUS=${RNNPIPE_SLURM_CPUS:-2}          # CPUs each simulated node claims
MEM_MB=${RNNPIPE_SLURM_MEM_MB:-8000}   # memory each node claims
HOST=$(hostname -s)
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

log() { echo "local-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
    && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "needs root to install $PACKAGES"
  log "installing $PACKAGES"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES >"$STATE/apt.log" 2>&1 \
    || die "apt-get install failed; see $STATE/apt.log"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_configs() {
  local last=$((17000 + NODES))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$STATE"
  cat >/etc/slurm/slurm.conf <<EOF
# Written by rnnpipe slurm/local-cluster.sh: a test cluster of $NODES simulated node(s) on $HOST.
ClusterName=rnnpipe
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd/%n
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
SlurmctldPort=6817
MailProg=/bin/true
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
MinJobAge=300
KillWait=10
InactiveLimit=0
NodeName=n[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$last] CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=rnnpipe-local
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local t=$1 what=$2
  shift 2
  for _ in $(seq $((t * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up in ${t} s (logs in $STATE)"
}

start() {
  [ "$(id -u)" = 0 ] || die "start needs root (it runs the daemons as root, without systemd)"
  mkdir -p "$STATE"
  install_packages
  write_configs
  # munge: as the munge user, with its socket in /run/munge
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  if ! alive "$STATE/munged.pid"; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --force 2>>"$STATE/munged.log" || true
    wait_for 10 munged test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
  fi
  wait_for 10 munge sh -c 'munge -n | unmunge'
  # mariadb for slurmdbd
  if ! alive "$STATE/mariadbd.pid"; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/mariadb-install.log" 2>&1
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 --port=3306 \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mariadbd.pid >"$STATE/mariadbd.log" 2>&1 &
    wait_for 30 mariadb mariadb --socket=/run/mysqld/mysqld.sock -e "select 1"
    cp /run/mysqld/mariadbd.pid "$STATE/mariadbd.pid"
    mariadb --socket=/run/mysqld/mysqld.sock -e "
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'rnnpipe-local';
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'rnnpipe-local';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  fi
  if ! alive "$STATE/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  sacctmgr -i -Q add cluster rnnpipe >/dev/null 2>&1 || true
  if ! alive "$STATE/slurmctld.pid"; then
    slurmctld -c   # -c: a fresh controller state (job ids restart at 1: use a new submitit folder per run)
    wait_for 30 slurmctld scontrol ping
  fi
  for i in $(seq 1 "$NODES"); do
    mkdir -p "/var/spool/slurmd/n$i"
    if ! alive "/run/slurmd-n$i.pid"; then
      slurmd -N "n$i"
      cp "/run/slurmd-n$i.pid" "$STATE/slurmd-n$i.pid" 2>/dev/null || true
    fi
  done
  wait_for 60 "$NODES idle node(s)" sh -c "[ \$(sinfo -h -t idle -o '%D' | awk '{s+=\$1} END {print s+0}') -ge $NODES ]"
  sleep 1
  for i in $(seq 1 "$NODES"); do cp "/run/slurmd-n$i.pid" "$STATE/slurmd-n$i.pid"; done
  log "up: $NODES node(s) idle (sinfo), accounting on (sacct); logs in $STATE"
}

stop() {
  local pids=()
  for f in "$STATE"/slurmd-n*.pid "$STATE/slurmctld.pid" "$STATE/slurmdbd.pid" "$STATE/mariadbd.pid" "$STATE/munged.pid"; do
    [ -f "$f" ] || continue
    if alive "$f"; then
      kill "$(cat "$f")" && pids+=("$(cat "$f")")
    fi
    rm -f "$f"
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  done
  log "stopped ${#pids[@]} daemon(s)"
}

status() {
  local any=0
  for f in "$STATE"/munged.pid "$STATE"/mariadbd.pid "$STATE"/slurmdbd.pid "$STATE"/slurmctld.pid "$STATE"/slurmd-n*.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; any=1
    else echo "$(basename "$f" .pid): not running"; fi
  done
  [ $any = 1 ] || { echo "no local cluster started from $STATE"; return 1; }
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [N] | stop | status" >&2; exit 2 ;;
esac
