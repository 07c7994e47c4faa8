#!/usr/bin/env bash
# Set up and run Chorus: virtualenv, migrations, a demo login, the offline model server when no model is
# configured, an agent worker when REDIS_URL is set, and the web server on http://127.0.0.1:${PORT:-8000}/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export DEBUG=${DEBUG:-1}
PORT=${PORT:-8000}
FAKELLM_PORT=${FAKELLM_PORT:-8001}
PY=.venv/bin/python

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

# The default metrics directory starts empty with each run (docs/operations.md, "Metrics").
if [ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then rm -rf "${CHORUS_VAR_DIR:-var}/metrics"; fi
$PY manage.py migrate --noinput
$PY manage.py demo_user

if [ -z "${OPENAI_API_KEY:-}" ] && [ -z "${OPENAI_BASE_URL:-}" ]; then
  $PY manage.py fakellm --host 127.0.0.1 --port "$FAKELLM_PORT" --demo-roles &
  pids+=($!)
  export OPENAI_BASE_URL="http://127.0.0.1:$FAKELLM_PORT/v1" CHORUS_OFFLINE_MODEL=1
  echo "Model: the offline model server on $OPENAI_BASE_URL (set OPENAI_API_KEY/OPENAI_BASE_URL for a real one)"
else
  echo "Model: ${OPENAI_MODEL:-chorus-offline} at ${OPENAI_BASE_URL:-https://api.openai.com/v1}"
fi

if [ -n "${REDIS_URL:-}" ]; then
  echo "Mode: Redis channel layer ($REDIS_URL); web server and agent worker run as separate processes"
  $PY manage.py runworker agent-runs &
  pids+=($!)
else
  echo "Mode: single process (in-memory channel layer, agent worker inside the web server)."
  echo "      Set REDIS_URL=redis://127.0.0.1:6379/0 to run web servers and agent workers separately."
fi

echo "Chorus: http://127.0.0.1:$PORT/  (log in with the demo login above)"
# Keepalive: a socket that stops reading is dropped instead of buffered forever; frames up to 8 MiB, so a
# very long answer's `message` event still goes out (docs/operations.md, "daphne's flags").
$PY -m chatproject.web -b 127.0.0.1 -p "$PORT" --ping-interval 10 --ping-timeout 20 \
  --websocket-max-message-size 8388608 chatproject.asgi:application &
pids+=($!)
wait -n "${pids[@]}"
