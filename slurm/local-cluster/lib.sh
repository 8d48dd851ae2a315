# Shared by up.sh and down.sh (sourced, not run).

say() { echo "[local-cluster] $*"; }

# A daemon is alive when its pid file names a live process with the expected command name: /run survives
# restarts here, so a stale pid may belong to another process, and a dead daemon stays a zombie briefly.
alive() {  # alive PIDFILE COMM
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -r "/proc/$pid/status" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}
