#!/usr/bin/env bash
# A real Prefect deployment on this machine (docs/scale-out.md): PostgreSQL 15 (Debian `postgresql`),
# `prefect server start` on it, `hotvm prefect setup` (work pool `hotvm`, a work queue per host of
# hotvm.yaml + `fleet`, host limits, notifications), `prefect deploy --all`.
#
#   scripts/prefect-server.sh start        # or `make server`; rerun = reuse what already runs
#   scripts/prefect-server.sh worker HOST  # or `make worker HOST=hv1`: a background worker for queue HOST
#                                          # on this machine (HOST=fleet: the fleet worker)
#   scripts/prefect-server.sh status
#   scripts/prefect-server.sh stop         # workers first, then the server, then PostgreSQL
#
# Settings (environment):
#   HOTVM_PG_DATA      PostgreSQL data dir               (default /var/lib/hotvm/pg)
#   HOTVM_PG_PORT      PostgreSQL port on 127.0.0.1      (default 5433)
#   HOTVM_PG_PASSWORD  if set: password auth on TCP (scram) for the `postgres` role; else trust on loopback.
#                      Only ever read from the environment, never written to a file.
#   HOTVM_PREFECT_HOST / HOTVM_PREFECT_PORT  the API     (default 127.0.0.1 / 4200)
#   HOTVM_STATE_DIR    pid files and logs                (default /var/lib/hotvm/prefect)
#   HOTVM_CONFIG       hotvm.yaml (its hosts become work queues; passed to workers)
#   PREFECT            the prefect command               (default .venv/bin/prefect, else `prefect`)
#   PREFECT_WORKER_QUERY_SECONDS  how often workers poll (default here 2; Prefect's own default 10)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PG_BIN=${HOTVM_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_DATA=${HOTVM_PG_DATA:-/var/lib/hotvm/pg}
PG_PORT=${HOTVM_PG_PORT:-5433}
API_HOST=${HOTVM_PREFECT_HOST:-127.0.0.1}
API_PORT=${HOTVM_PREFECT_PORT:-4200}
STATE=${HOTVM_STATE_DIR:-/var/lib/hotvm/prefect}
WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
POOL=hotvm  # the routing convention (docs/scale-out.md): prefect.yaml and the fleet flows use this name
HOTVM_CONFIG=$(realpath -m "${HOTVM_CONFIG:-$REPO/hotvm.yaml}")
if [ -z "${PREFECT:-}" ]; then
  if [ -x "$REPO/.venv/bin/prefect" ]; then PREFECT=$REPO/.venv/bin/prefect; else PREFECT=prefect; fi
fi
PYTHON=$(dirname "$(command -v "$PREFECT")")/python
[ -x "$PYTHON" ] || PYTHON=python3

export PREFECT_API_URL="http://$API_HOST:$API_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
# The server's database, as separate settings: the password (if any) stays in this environment only.
export PREFECT_API_DATABASE_DRIVER=postgresql+asyncpg PREFECT_API_DATABASE_HOST=127.0.0.1
export PREFECT_API_DATABASE_PORT=$PG_PORT PREFECT_API_DATABASE_USER=postgres PREFECT_API_DATABASE_NAME=prefect
if [ -n "${HOTVM_PG_PASSWORD:-}" ]; then export PREFECT_API_DATABASE_PASSWORD=$HOTVM_PG_PASSWORD; fi

log() { echo "prefect-server: $*" >&2; }

as_pg() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() { [ -f "$PG_DATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

psql_local() {  # over the Unix socket in the data dir (local trust, socket mode 0700: its owner only)
  as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DATA" -p "$PG_PORT" -U postgres -d "${1:-postgres}" \
    "${@:2}"
}

start_postgres() {
  [ -x "$PG_BIN/initdb" ] || { log "no $PG_BIN/initdb: apt-get install postgresql (scripts/install-system-deps.sh)"; exit 1; }
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_DATA"
    chmod 700 "$PG_DATA"
    local auth_host=trust
    [ -n "${HOTVM_PG_PASSWORD:-}" ] && auth_host=scram-sha-256
    log "initdb $PG_DATA (TCP auth: $auth_host)"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --auth-local=trust --auth-host="$auth_host" \
      --no-instructions >/dev/null
    cat >>"$PG_DATA/postgresql.conf" <<EOF
# hotvm (scripts/prefect-server.sh): loopback only, socket in the data dir
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
unix_socket_permissions = 0700
EOF
  fi
  if pg_running; then
    log "PostgreSQL already running ($PG_DATA)"
  else
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/postgresql.log" -w -t 60 \
      -o "-p $PG_PORT -k $PG_DATA -c listen_addresses=127.0.0.1" start >/dev/null
  fi
  if [ -n "${HOTVM_PG_PASSWORD:-}" ]; then
    # psql reads the password from its environment (\getenv): it is on no command line and in no file
    printf '%s\n' '\getenv pw HOTVM_PG_PASSWORD' "ALTER ROLE postgres PASSWORD :'pw';" \
      | HOTVM_PG_PASSWORD=$HOTVM_PG_PASSWORD psql_local postgres -f -
  fi
  if [ "$(psql_local postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'prefect'")" != 1 ]; then
    psql_local postgres -c "CREATE DATABASE prefect"
  fi
}

api_healthy() { "$PYTHON" - "$PREFECT_API_URL/health" <<'EOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_server() {
  mkdir -p "$STATE"
  if api_healthy; then
    log "Prefect server already answers at $PREFECT_API_URL"
    return
  fi
  log "starting prefect server on $API_HOST:$API_PORT (log $STATE/server.log)"
  setsid "$PREFECT" server start --host "$API_HOST" --port "$API_PORT" </dev/null >>"$STATE/server.log" 2>&1 &
  echo $! >"$STATE/server.pid"
  for _ in $(seq 240); do
    api_healthy && return
    pid_alive "$STATE/server.pid" || break
    sleep 0.5
  done
  log "the server did not become healthy: see $STATE/server.log"
  tail -n 30 "$STATE/server.log" >&2 || true
  exit 1
}

hosts() {  # host names of hotvm.yaml, or "local" without one
  "$PYTHON" - "$HOTVM_CONFIG" <<'EOF' 2>/dev/null || echo local
import sys
from hotvm.config_file import load_config
print("\n".join(h.name for h in load_config(sys.argv[1]).hosts) or "local")
EOF
}

deploy() {
  if [ -f "$HOTVM_CONFIG" ]; then  # pool, a queue per host + fleet, host limits, notifications
    (cd "$REPO" && HOTVM_CONFIG=$HOTVM_CONFIG "$PYTHON" -m hotvm prefect setup >"$STATE/setup.log" 2>&1) \
      || { cat "$STATE/setup.log" >&2; exit 1; }
    log "hotvm prefect setup done (log $STATE/setup.log)"
  else  # no hotvm.yaml yet: the pool and the fleet queue; rerun after writing it
    "$PREFECT" --no-prompt work-pool inspect "$POOL" >/dev/null 2>&1 \
      || "$PREFECT" --no-prompt work-pool create "$POOL" --type process >/dev/null
    "$PREFECT" --no-prompt work-queue inspect fleet --pool "$POOL" >/dev/null 2>&1 \
      || "$PREFECT" --no-prompt work-queue create fleet --pool "$POOL" >/dev/null
    log "no $HOTVM_CONFIG: created work pool $POOL and queue fleet only (rerun start once it exists)"
  fi
  (cd "$REPO" && "$PREFECT" --no-prompt deploy --all >"$STATE/deploy.log" 2>&1) \
    || { cat "$STATE/deploy.log" >&2; exit 1; }
  log "deployed prefect.yaml (log $STATE/deploy.log)"
}

start_worker() {  # a background worker for one work queue (a hypervisor host, or fleet), on this machine
  local host=$1 pidfile="$STATE/worker-$1.pid"
  mkdir -p "$STATE"
  if pid_alive "$pidfile"; then log "worker for $host already running (pid $(cat "$pidfile"))"; return; fi
  cd "$REPO"
  # Every flow run is a new Python process importing hotvm from this checkout: compile it once here, so no
  # run compiles it again (a read-only checkout or PYTHONDONTWRITEBYTECODE=1 would make each one do it).
  "$PYTHON" -m compileall -q -j 0 flows tasks hotvm targets >/dev/null || log "compileall failed (runs compile at import)"
  # Poll every 2 s (Prefect's default 10 s): a fleet run's per-VM children start within ~2 s of the parent
  HOTVM_CONFIG=$HOTVM_CONFIG PREFECT_WORKER_QUERY_SECONDS=$WORKER_QUERY_SECONDS \
    setsid "$PREFECT" worker start --pool "$POOL" --work-queue "$host" \
    --name "hotvm-$host" \
    </dev/null >>"$STATE/worker-$host.log" 2>&1 &
  echo $! >"$pidfile"
  log "worker for $host started (pid $(cat "$pidfile"), log $STATE/worker-$host.log)"
}

stop_pidfile() {  # TERM the process group, KILL after 20 s
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

print_hints() {
  cat <<EOF

Prefect UI/API: http://$API_HOST:$API_PORT   (PREFECT_API_URL=$PREFECT_API_URL)
Start one worker per hypervisor host, on that host (it reaches the VMs' QMP sockets), and the fleet worker:
EOF
  local h
  for h in $(hosts) fleet; do
    echo "  PREFECT_API_URL=$PREFECT_API_URL HOTVM_CONFIG=$HOTVM_CONFIG PREFECT_WORKER_QUERY_SECONDS=2 \\"
    echo "    $PREFECT worker start --pool $POOL --work-queue $h      # or here: make worker HOST=$h"
  done
  echo "Stop everything: $0 stop"
}

case "${1:-start}" in
  start)
    start_postgres
    start_server
    deploy
    print_hints
    ;;
  worker)
    [ -n "${2:-}" ] || { echo "usage: $0 worker HOST" >&2; exit 2; }
    api_healthy || { log "no Prefect server at $PREFECT_API_URL: run '$0 start' first"; exit 1; }
    start_worker "$2"
    ;;
  status)
    pg_running && echo "postgresql: running ($PG_DATA, port $PG_PORT)" || echo "postgresql: stopped"
    api_healthy && echo "prefect server: $PREFECT_API_URL" || echo "prefect server: not answering"
    for f in "$STATE"/worker-*.pid; do
      [ -f "$f" ] && pid_alive "$f" && echo "worker: $(basename "$f" .pid) (pid $(cat "$f"))"
    done
    true
    ;;
  stop)
    # Workers first (a worker hung when the server went away first), then the server, then PostgreSQL.
    for f in "$STATE"/worker-*.pid; do [ -f "$f" ] && stop_pidfile "$f"; done
    stop_pidfile "$STATE/server.pid"
    if pg_running; then as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null; fi
    log "stopped"
    ;;
  *)
    echo "usage: $0 [start|worker HOST|status|stop]" >&2
    exit 2
    ;;
esac
