#!/usr/bin/env bash
# A one-node Slurm (with accounting and a preemption partition) on this machine, for tests and demos.
#
#   scripts/slurm_local.sh start    install (apt, once per machine) and start munged, mariadbd, slurmdbd,
#                                   slurmctld, slurmd; idempotent (running daemons are left alone)
#   scripts/slurm_local.sh stop     cancel all jobs, stop the daemons by their pid files
#   scripts/slurm_local.sh status   daemons, partitions, queue
#   scripts/slurm_local.sh env      print `export SLURM_CONF=...` (clients need it unless /etc/slurm is ours)
#
# Needs root and Debian/Ubuntu apt (packages slurmctld slurmd slurm-client slurmdbd munge mariadb-server).
# No systemd: the daemons are started directly. Configs, logs, pid files, the database and Slurm's state
# live in $SMALLSSL_SLURM_DIR (default /tmp/smallssl-slurm), outside the repository.
# Partitions: `debug` (default, preemptable: PreemptMode=REQUEUE, GraceTime 30 s) and `urgent` (higher
# PriorityTier: a job there preempts debug jobs, which get SIGUSR2 first thanks to preempt_send_user_signal).
# The node declares SMALLSSL_SLURM_CPUS CPUs (default 8, more than the machine has) so that several 1-CPU
# test jobs run at once.
set -euo pipefail

STATE=${SMALLSSL_SLURM_DIR:-/tmp/smallssl-slurm}
CPUS=${SMALLSSL_SLURM_CPUS:-8}
CONF=$STATE/etc/slurm.conf
DBDCONF=$STATE/etc/slurmdbd.conf      # slurmdbd reads slurmdbd.conf beside $SLURM_CONF
MUNGE_SOCK=/run/munge/munge.socket.2  # the default: sacctmgr's connection to slurmdbd ignores AuthInfo=socket
MYSQL_SOCK=/run/mysqld/mysqld.sock   # slurmdbd's MySQL client uses the default socket with StorageHost=localhost
PKGS="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
export SLURM_CONF=$CONF

log() { echo "[slurm_local] $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # alive PIDFILE -> 0 if the process in it runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT CMD...
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${t}s waiting for $what (logs in $STATE/log)"
        sleep 0.2
    done
}

install_packages() {
    local missing=0 b
    for b in slurmctld slurmd slurmdbd sbatch munged mariadbd mariadb-install-db; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    log "installing $PKGS (apt, --no-install-recommends)"
    # A policy-rc.d that exits 101 stops the packages' maintainer scripts from starting services.
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [[ -e $policy ]] && had_policy=1 && cp -p "$policy" "$STATE/policy-rc.d.orig"
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends $PKGS >"$STATE/log/apt.log" 2>&1 ||
            { apt-get update -q >>"$STATE/log/apt.log" 2>&1 &&
              apt-get install -y -q --no-install-recommends $PKGS >>"$STATE/log/apt.log" 2>&1; }
    } || rc=$?
    if ((had_policy)); then mv "$STATE/policy-rc.d.orig" "$policy"; else rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install failed (see $STATE/log/apt.log)"
}

write_configs() {
    local host node mem
    host=$(hostname -s)
    # The node line comes from `slurmd -C` (real sockets/cores, RealMemory); we only raise CPUs.
    node=$(slurmd -C | grep '^NodeName=' | head -1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    [[ -n $mem ]] || die "could not parse RealMemory from 'slurmd -C': $node"
    mkdir -p "$STATE/etc" "$STATE/ctld" "$STATE/spool" "$STATE/log" "$STATE/run"
    cat >"$CONF" <<EOF
# written by scripts/slurm_local.sh
ClusterName=smallssl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# fast turnaround: short scheduler intervals, short kill wait, quick requeue (cred_expire above)
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000,batch_sched_delay=0
MessageTimeout=20
KillWait=5
MinJobAge=600
InactiveLimit=0
JobRequeue=1
# accounting (sacct) through slurmdbd: submitit needs it to see job states
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
# preemption: urgent (PriorityTier 10) requeues debug jobs; USR2 is sent to them first
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    cat >"$DBDCONF" <<EOF
# written by scripts/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=smallssl_acct_db
EOF
    chmod 600 "$DBDCONF"
    # Clients find the config through SLURM_CONF; also link /etc/slurm/slurm.conf when nobody else owns it.
    mkdir -p /etc/slurm
    if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
}

start_munge() {
    alive "$STATE/run/munged.pid" && return 0
    [[ -s /etc/munge/munge.key ]] || {
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    }
    chmod 400 /etc/munge/munge.key
    chown root:root /etc/munge/munge.key
    mkdir -p /run/munge
    munged --force --socket="$MUNGE_SOCK" --pid-file="$STATE/run/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/run/munged.seed"
    wait_for 10 munged test -S "$MUNGE_SOCK"
}

start_mariadb() {
    alive "$STATE/run/mariadbd.pid" && return 0
    mkdir -p /run/mysqld
    if [[ ! -d $STATE/mysql/mysql ]]; then
        mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
            --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
    fi
    nohup mariadbd --user=root --datadir="$STATE/mysql" --skip-networking --socket="$MYSQL_SOCK" \
        --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
        --innodb-buffer-pool-size=32M --skip-log-bin </dev/null >/dev/null 2>&1 &
    wait_for 30 mariadbd mariadb --socket="$MYSQL_SOCK" -e "select 1"
}

start_slurmdbd() {
    alive "$STATE/run/slurmdbd.pid" && return 0
    slurmdbd 2>>"$STATE/log/slurmdbd.log"
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster smallssl >/dev/null 2>&1 || true
}

start_slurmctld() {
    alive "$STATE/run/slurmctld.pid" && return 0
    slurmctld -f "$CONF" 2>>"$STATE/log/slurmctld.log"
    wait_for 30 slurmctld scontrol ping
}

node_ready() {  # 0 once the node takes jobs; a node left drained/down by an unclean stop is resumed
    local state
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1)
    case $state in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        drain* | down*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    return 1
}

start_slurmd() {
    alive "$STATE/run/slurmd.pid" || slurmd -f "$CONF" 2>>"$STATE/log/slurmd.log"
    wait_for 30 "node $(hostname -s) to take jobs" node_ready
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "needs root (it installs packages and runs the Slurm daemons as root)"
    mkdir -p "$STATE/log" "$STATE/run"
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    log "running (state in $STATE; export SLURM_CONF=$CONF)"
}

stop_pidfiles() {  # stop_pidfiles NAME...: SIGTERM the pids in $STATE/run/NAME.pid together, wait, then SIGKILL
    local name pids=() i pid
    for name in "$@"; do
        alive "$STATE/run/$name.pid" && pids+=("$(cat "$STATE/run/$name.pid")")
    done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { log "pid $pid ignored SIGTERM; SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
    done
    for name in "$@"; do rm -f "$STATE/run/$name.pid"; done
}

cmd_stop() {
    if alive "$STATE/run/slurmctld.pid" && alive "$STATE/run/slurmd.pid"; then
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        # Let the steps finish and report first: a slurmstepd whose slurmctld/slurmd vanished retries forever.
        local end=$((SECONDS + 60))
        while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
    # in dependency order, each layer in parallel: Slurm daemons, then accounting, then database and munge
    stop_pidfiles slurmd slurmctld
    stop_pidfiles slurmdbd
    stop_pidfiles mariadbd munged
    if compgen -G "$STATE/spool/$(hostname -s)_*" >/dev/null; then
        log "warning: job steps still registered in $STATE/spool (their slurmstepd finishes after the next start)"
    fi
    log "stopped"
}

cmd_status() {
    local d rc=0
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$STATE/run/$d.pid"; then echo "$d: running (pid $(cat "$STATE/run/$d.pid"))"
        else echo "$d: stopped"; rc=3; fi
    done
    if ((rc == 0)); then sinfo; squeue; fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state dir: $STATE)" >&2; exit 2 ;;
esac
