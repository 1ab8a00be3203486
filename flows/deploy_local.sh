#!/usr/bin/env bash
# The whole Prefect deployment path, locally, for the `demo` deployment of prefect.yaml:
# a Prefect server on a free 127.0.0.1 port -> the `rsm-process` process work pool -> `prefect deploy`
# -> a process worker -> `prefect deployment run mine-rsm/demo --watch`. Exits with the run's status;
# server and worker are stopped on exit (also on error or Ctrl-C).
#
# usage: flows/deploy_local.sh [extra `prefect deployment run` options, e.g. --param out=/tmp/shards]
# env:   PREFECT_BIN    the prefect executable (default: .venv/bin/prefect, else `prefect` on PATH)
#        RSM_DEPLOYMENT deployment to run (default: demo)
#        PREFECT_HOME   kept if set; otherwise a temporary one is used and removed on exit
#        RSM_WATCH_TIMEOUT_S  seconds to wait for the run (default: 1800)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
PREFECT_BIN="${PREFECT_BIN:-}"
if [[ -z "$PREFECT_BIN" ]]; then
  if [[ -x .venv/bin/prefect ]]; then PREFECT_BIN="$REPO_DIR/.venv/bin/prefect"; else PREFECT_BIN=prefect; fi
fi
PYTHON_BIN="$(dirname "$(command -v "$PREFECT_BIN")")/python"
[[ -x "$PYTHON_BIN" ]] || PYTHON_BIN=python3
DEPLOYMENT="${RSM_DEPLOYMENT:-demo}"
WATCH_TIMEOUT_S="${RSM_WATCH_TIMEOUT_S:-1800}"

log() { printf '[deploy_local %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A private Prefect home and API: never touch the user's profile or another server
TMP_HOME=""
if [[ -z "${PREFECT_HOME:-}" ]]; then
  TMP_HOME="$(mktemp -d "${TMPDIR:-/tmp}/rsm-prefect-home.XXXXXX")"
  export PREFECT_HOME="$TMP_HOME"
fi
PORT="$("$PYTHON_BIN" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# the server streams flow-run logs (a failed run's reason) to `--watch` only with these on
export PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"  # pick the run up quickly
unset PREFECT_API_KEY
LOG_DIR="$PREFECT_HOME/deploy_local_logs"
mkdir -p "$LOG_DIR"

SERVER_PID=""
WORKER_PID=""
cleanup() {
  local rc=$?
  # setsid gave each background process its own process group: stop the whole group
  for pid in "$WORKER_PID" "$SERVER_PID"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      # (SIGINT would not do: bash starts background commands with SIGINT ignored)
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 25); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 -- "-$pid" 2>/dev/null && log "process group $pid still alive after 5 s: killing it"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  done
  if [[ $rc -ne 0 ]]; then
    for f in "$LOG_DIR"/*.log; do [[ -f "$f" ]] && { log "--- tail of $f"; tail -n 40 "$f" >&2; }; done
  fi
  [[ -n "$TMP_HOME" ]] && rm -rf "$TMP_HOME"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$SECONDS
log "starting Prefect server on $PREFECT_API_URL (PREFECT_HOME=$PREFECT_HOME)"
setsid "$PREFECT_BIN" server start --host 127.0.0.1 --port "$PORT" >"$LOG_DIR/server.log" 2>&1 &
SERVER_PID=$!
disown "$SERVER_PID"  # cleanup() stops it; no job-control chatter from bash
for _ in $(seq 240); do
  if "$PYTHON_BIN" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$PREFECT_API_URL/health" 2>/dev/null; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { log "server exited early"; exit 1; }
  sleep 0.5
done
"$PYTHON_BIN" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
  "$PREFECT_API_URL/health" || { log "server not healthy after 120 s"; exit 1; }
log "server (pid $SERVER_PID) healthy after $((SECONDS - t0)) s"

"$PREFECT_BIN" work-pool create rsm-process --type process --overwrite >"$LOG_DIR/pool.log" 2>&1
log "work pool rsm-process ready"

"$PREFECT_BIN" --no-prompt deploy --name "$DEPLOYMENT" >"$LOG_DIR/deploy.log" 2>&1
log "deployed mine-rsm/$DEPLOYMENT from prefect.yaml"

setsid "$PREFECT_BIN" worker start --pool rsm-process --type process >"$LOG_DIR/worker.log" 2>&1 &
WORKER_PID=$!
disown "$WORKER_PID"
log "worker started (pid $WORKER_PID); running mine-rsm/$DEPLOYMENT $*"

"$PREFECT_BIN" deployment run "mine-rsm/$DEPLOYMENT" --watch --watch-timeout "$WATCH_TIMEOUT_S" "$@"
log "mine-rsm/$DEPLOYMENT completed; whole path took $((SECONDS - t0)) s"
