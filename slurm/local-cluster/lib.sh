# Shared by up.sh and down.sh (sourced, not run).

say() { echo "[local-cluster] $*"; }

# A daemon is alive when its pid file names a live process with the expected command name: /run survives
# restarts here, so a stale pid may belong to another process, and a dead daemon stays a zombie briefly.
alive() {  # alive PIDFILE COMM
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1  # also when it vanishes: a daemon removes its pid file on exit
    [ -n "$pid" ] || return 1
    [ -r "/proc/$pid/status" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}

# slurm.conf's SlurmdPidFile=/run/slurm/slurmd-%n.pid; slurmd.pid is where the one-node config of earlier
# versions of up.sh put it.
slurmd_pidfile() { echo "/run/slurm/slurmd-$1.pid"; }  # slurmd_pidfile NODE
slurmd_pidfiles() { compgen -G '/run/slurm/slurmd*.pid' || true; }
any_slurmd_alive() {
    local file
    for file in $(slurmd_pidfiles); do alive "$file" slurmd && return 0; done
    return 1
}

# The /etc/hosts line that up.sh adds for node names n1..nN ends with this marker; down.sh removes it.
HOSTS_MARKER="# added by emformer slurm/local-cluster/up.sh"

set_hosts_line() {  # set_hosts_line LINE: replace the marked line of /etc/hosts by LINE (none if empty)
    local tmp
    tmp=$(mktemp /etc/.hosts.XXXXXX)
    grep -vF "$HOSTS_MARKER" /etc/hosts > "$tmp" || true
    [ -z "$1" ] || printf '%s  %s\n' "$1" "$HOSTS_MARKER" >> "$tmp"
    chmod --reference=/etc/hosts "$tmp"
    chown --reference=/etc/hosts "$tmp"
    # Renamed into place; where /etc/hosts is a bind mount (containers) that fails: rewrite it in place.
    if ! mv -f "$tmp" /etc/hosts 2>/dev/null; then
        cat "$tmp" > /etc/hosts
        rm -f "$tmp"
    fi
}
