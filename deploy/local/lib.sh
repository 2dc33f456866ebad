# Shared by the deploy/local scripts: paths, ports and small helpers. Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK_DIR="${QUARRY_STACK_DIR:-$ROOT/.quarry/stack}"
CRATES_DIR="${QUARRY_CRATES_DIR:-${CARGO_HOME:-$HOME/.cargo}/registry/cache}"
# The real corpus (deploy/local/corpus.list with every dependency), collected once per machine.
CORPUS_DIR="${QUARRY_CORPUS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/quarry/corpus}"
S3_PORT=9014
REGISTRY_PORT=9015

say() { printf '[quarry] %s\n' "$*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the postgres superuser over the local socket (peer or trust auth).
# From /, which the postgres user can always read (it may not read the checkout).
as_postgres() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && sudo -u postgres "$@")
    fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: retries COMMAND until it succeeds or time runs out.
wait_for() {
    local name=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "$name did not come up within ${seconds}s"
            return 1
        fi
        sleep 0.5
    done
}

# start_background NAME COMMAND...: starts a daemon, its pid in $STACK_DIR/NAME.pid.
start_background() {
    local name=$1
    shift
    nohup "$@" >"$STACK_DIR/logs/$name.log" 2>&1 &
    echo $! >"$STACK_DIR/$name.pid"
}

# stop_background NAME: stops a daemon started by start_background, if it still runs.
stop_background() {
    local pidfile="$STACK_DIR/$1.pid"
    [[ -f $pidfile ]] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping $1"
        kill "$pid"
    fi
    rm -f "$pidfile"
}
