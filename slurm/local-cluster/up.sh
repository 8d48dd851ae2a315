#!/usr/bin/env bash
# Start a real single-node SLURM on this machine (Debian/Ubuntu, as root, no systemd).
#
#   sudo slurm/local-cluster/up.sh      # installs munge + slurm if missing, writes the config, starts daemons
#   sudo slurm/local-cluster/down.sh    # cancels jobs, stops the daemons by pid file
#
# Exit status: 0 up, 3 SLURM cannot be installed here (no apt-get, or apt fails), 1 any other failure.
# Idempotent: when the daemons already run and the node is idle it only prints the state.
# The node gets the CPUs and 90% of the memory that `slurmd -C` reports; one partition, `debug`.
# Writes /etc/slurm/slurm.conf, but refuses to replace one it did not write (FORCE=1 overrides).
set -euo pipefail

MARKER="# written by emformer slurm/local-cluster/up.sh"
CONF=/etc/slurm/slurm.conf
PARTITION=${PARTITION:-debug}
HOST=$(hostname -s)

. "$(dirname "$0")/lib.sh"  # say, alive
die() { echo "[local-cluster] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out waiting for $what"
        sleep 0.1
    done
}

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    # Exit status 3: SLURM cannot be installed here (the test suite skips its SLURM tests on it).
    command -v apt-get >/dev/null || { echo "[local-cluster] error: SLURM is not installed and there is no apt-get to install it" >&2; exit 3; }
    say "installing munge + slurm (Debian slurm-wlm pieces)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { echo "[local-cluster] error: apt-get update failed: no package registry reachable?" >&2; exit 3; }
    # policy-rc.d may print "denied execution of start": harmless, we start the daemons by hand.
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null \
        || { echo "[local-cluster] error: apt-get install munge slurmctld slurmd slurm-client failed" >&2; exit 3; }
fi

# 2. munge.
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid munged; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi
wait_for 10 "munge" bash -c 'munge -n | unmunge'

# 3. slurm.conf from this machine's hardware.
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; refusing to replace it (FORCE=1 to override)"
fi
hw=$(slurmd -C | head -1)
field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
# slurmd -C says SocketsPerBoard (with Boards) on some versions and Sockets on others.
cpus=$(field CPUs); boards=$(field Boards); sockets=$(field Sockets); cores=$(field CoresPerSocket)
threads=$(field ThreadsPerCore)
[ -n "$sockets" ] || sockets=$(( ${boards:-1} * $(field SocketsPerBoard) ))
memory=$(( $(field RealMemory) * 9 / 10 ))  # a node with less memory than it claims is drained
install -d /etc/slurm /var/spool/slurm/ctld /var/spool/slurm/d /var/log/slurm /run/slurm
new_conf=$(cat <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job restarts ~11 s after the requeue (the default 120 s would make tests slow).
AuthInfo=cred_expire=10
MpiDefault=none
# cgroup tracking needs a freezer this machine lacks; pgid works but adds ~3 s per srun.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting daemon: no sacct; finished jobs stay visible to scontrol for MinJobAge (300 s).
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurm/ctld
SlurmdSpoolDir=/var/spool/slurm/d
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
fi

# 4. Daemons: slurmctld first, then slurmd once the controller answers.
if [ $conf_changed = 1 ] && { alive /run/slurm/slurmctld.pid slurmctld || alive /run/slurm/slurmd.pid slurmd; }; then
    say "config changed: restarting the daemons"
    KEEP_MUNGE=1 "$(dirname "$0")/down.sh"
fi
if ! alive /run/slurm/slurmctld.pid slurmctld; then
    say "starting slurmctld"
    /usr/sbin/slurmctld
fi
wait_for 20 "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'
if ! alive /run/slurm/slurmd.pid slurmd; then
    say "starting slurmd"
    /usr/sbin/slurmd
fi

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1; }
deadline=$((SECONDS + 30))
while :; do
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            # Left over from an earlier start (e.g. a node that went away): bring it back.
            scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    [ $SECONDS -lt $deadline ] || die "node $HOST is '$state' after 30 s (see /var/log/slurm/slurmd.log)"
    sleep 0.1
done
say "up: node $HOST ($cpus CPUs, ${memory} MB) in partition '$PARTITION' is $state"
