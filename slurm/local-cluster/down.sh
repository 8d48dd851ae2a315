#!/usr/bin/env bash
# Stop the local SLURM started by up.sh: cancel all jobs, then stop every slurmd, slurmctld and munged by pid
# file, and remove the node names up.sh added to /etc/hosts (a line it marked; nothing else is touched).
# Jobs go first: with proctrack/linuxproc a job's slurmstepd outlives slurmd otherwise.
# KEEP_MUNGE=1 leaves munged running.
set -uo pipefail

. "$(dirname "$0")/lib.sh"  # say, alive, slurmd_pidfiles, HOSTS_MARKER, set_hosts_line

stop() {  # stop PIDFILE COMM: SIGTERM, wait up to 10 s, then SIGKILL
    local pid i
    alive "$1" "$2" || return 0
    pid=$(cat "$1" 2>/dev/null) || return 0
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do alive "$1" "$2" || return 0; sleep 0.1; done
    say "$2 did not stop in 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

if alive /run/slurm/slurmctld.pid slurmctld && command -v scancel >/dev/null; then
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        say "cancelling jobs"
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || scancel --quiet --user="$(id -un)" || true
        for i in $(seq 100); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
fi
for pidfile in $(slurmd_pidfiles); do stop "$pidfile" slurmd; done
stop /run/slurm/slurmctld.pid slurmctld
[ "${KEEP_MUNGE:-0}" = 1 ] || stop /run/munge/munged.pid munged
if grep -qF "$HOSTS_MARKER" /etc/hosts 2>/dev/null; then
    say "/etc/hosts: removing the node names up.sh added"
    set_hosts_line ""
fi
say "down"
