#!/usr/bin/env bash
# Start a real SLURM on this machine (Debian/Ubuntu, as root, no systemd): one node, or N nodes on one host.
#
#   sudo slurm/local-cluster/up.sh              # installs munge + slurm if missing, writes the config, starts daemons
#   sudo slurm/local-cluster/up.sh --nodes 2    # nodes n1, n2: one slurmd each, on this host
#   sudo slurm/local-cluster/up.sh --fresh      # a controller it starts forgets the jobs an earlier one saved
#   sudo slurm/local-cluster/down.sh            # cancels jobs, stops the daemons by pid file
#
# Exit status: 0 up, 3 SLURM cannot be installed here (no apt-get, or apt fails), 1 any other failure.
# Idempotent: when the daemons already run with this config and the nodes are idle it only prints the state;
# a different --nodes rewrites the config and restarts the daemons.
# One node is named after this host and gets the CPUs and 90% of the memory that `slurmd -C` reports. N > 1
# nodes are n1..nN (Debian's slurmd is built with MULTIPLE_SLURMD): each its own slurmd with its own port, pid,
# spool and log file, and an equal share of the CPUs (at least 1) and of that memory; they share the host's
# cores and memory (no cgroups), so ranks and environment differ, nothing else. Their names must resolve,
# because Lightning takes MASTER_ADDR from the first node's name: up.sh adds `127.0.0.1 n1 .. nN` to
# /etc/hosts when they do not (marked, and removed again by down.sh). One partition, `debug`.
# Writes /etc/slurm/slurm.conf, but refuses to replace one it did not write (FORCE=1 overrides).
# --fresh (the test suite's): a slurmctld that up.sh starts is started with -c, so the jobs in its saved state
# are dropped. Without it, a controller killed while a job ran (a machine stopped mid-test) comes back with that
# job still RUNNING on nodes that no longer run it, and it holds them until its time limit.
set -euo pipefail

MARKER="# written by emformer slurm/local-cluster/up.sh"
CONF=/etc/slurm/slurm.conf
PARTITION=${PARTITION:-debug}
HOST=$(hostname -s)
NODES=${NODES:-1}
FRESH=0

. "$(dirname "$0")/lib.sh"  # say, alive, slurmd_pidfile, HOSTS_MARKER
die() { echo "[local-cluster] error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        --fresh) FRESH=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (expected --nodes N or --fresh)" ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes: expected an integer >= 1, got '$NODES'"
if [ "$NODES" -eq 1 ]; then node_names=("$HOST"); else node_names=($(seq -f 'n%g' 1 "$NODES")); fi

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
cpus=$(field CPUs)
memory=$(( $(field RealMemory) * 9 / 10 / NODES ))  # a node with less memory than it claims is drained
if [ "$NODES" -eq 1 ]; then
    # slurmd -C says SocketsPerBoard (with Boards) on some versions and Sockets on others.
    boards=$(field Boards); sockets=$(field Sockets); cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore)
    [ -n "$sockets" ] || sockets=$(( ${boards:-1} * $(field SocketsPerBoard) ))
    node_cpus=$cpus
    node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory State=UNKNOWN"
else
    # slurmd logs "Node configuration differs from hardware" for these shares of the host: harmless.
    node_cpus=$(( cpus / NODES > 0 ? cpus / NODES : 1 ))
    node_lines=$(for i in $(seq "$NODES"); do
        echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$node_cpus RealMemory=$memory State=UNKNOWN"
    done)
fi
install -d /etc/slurm /var/spool/slurm/ctld /var/log/slurm /run/slurm
for name in "${node_names[@]}"; do install -d "/var/spool/slurm/d-$name"; done
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
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
# %n is the node name: one pid, spool and log file per slurmd, also when several run on this host.
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurm/d-%n
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
$node_lines
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
fi

# 4. Daemons: slurmctld first, then one slurmd per node once the controller answers.
if [ $conf_changed = 1 ] && { alive /run/slurm/slurmctld.pid slurmctld || any_slurmd_alive; }; then
    say "config changed: restarting the daemons"
    KEEP_MUNGE=1 "$(dirname "$0")/down.sh"
fi

# 5. Node names that must resolve (only n1..nN; one node is this host): ours (on the line up.sh added) stay,
# names that do not resolve are added. /etc/hosts comes first in the usual nsswitch order, so a name that
# already resolves elsewhere would be hijacked: refuse instead.
ours=$(grep -F "$HOSTS_MARKER" /etc/hosts | head -1) || true
needed=()
if [ "$NODES" -gt 1 ]; then
    for name in "${node_names[@]}"; do
        if echo "${ours%%#*}" | grep -qw -- "$name"; then needed+=("$name"); continue; fi
        address=$(getent hosts "$name" | awk '{print $1; exit}') || true
        case "$address" in
            "") needed+=("$name") ;;
            127.*|::1) ;;
            *) die "node name '$name' resolves to $address, not to this host; free the name or run without --nodes" ;;
        esac
    done
fi
hosts_line=${needed[*]:+127.0.0.1 ${needed[*]}}
if [ "$ours" != "${hosts_line:+$hosts_line  $HOSTS_MARKER}" ]; then
    if [ -n "$hosts_line" ]; then say "/etc/hosts: node names: '$hosts_line'"
    else say "/etc/hosts: removing the node names added earlier"; fi
    set_hosts_line "$hosts_line"
fi

if ! alive /run/slurm/slurmctld.pid slurmctld; then
    if [ "$FRESH" = 1 ]; then
        say "starting slurmctld (--fresh: without the jobs of its saved state)"
        /usr/sbin/slurmctld -c
    else
        say "starting slurmctld"
        /usr/sbin/slurmctld
    fi
fi
wait_for 20 "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'
for name in "${node_names[@]}"; do
    if ! alive "$(slurmd_pidfile "$name")" slurmd; then
        say "starting slurmd for node $name"
        /usr/sbin/slurmd -N "$name"
    fi
done

nodes=$(IFS=,; echo "${node_names[*]}")
deadline=$((SECONDS + 30))
while :; do
    listed=$(sinfo -h -N -n "$nodes" -o %T 2>/dev/null) || true
    states=$(echo "$listed" | sort -u | tr '\n' ' ')
    ready=$(echo "$listed" | grep -cE '^(idle|mixed|allocated|completing)$') || true
    [ "${ready:-0}" -ge "$NODES" ] && break
    if echo "$states" | grep -qE 'down|drain|fail'; then
        # Left over from an earlier start (e.g. a node that went away): bring it back.
        scontrol update nodename="$nodes" state=resume >/dev/null 2>&1 || true
    fi
    [ $SECONDS -lt $deadline ] || die "nodes $nodes are '${states% }' after 30 s (see /var/log/slurm/slurmd-*.log)"
    sleep 0.1
done
if [ "$NODES" -eq 1 ]; then
    say "up: node $HOST ($cpus CPUs, ${memory} MB) in partition '$PARTITION' is ${states% }"
else
    say "up: nodes $nodes on this host ($node_cpus CPUs, ${memory} MB each) in partition '$PARTITION' are ${states% }"
fi
