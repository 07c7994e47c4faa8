#!/usr/bin/env bash
# Run the whole test suite: lint, migration and deploy checks, then pytest (runner, socket, HTTP, real
# processes over Redis, and a real headless Chromium). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
PY=.venv/bin/python

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# Redis: the tests use database 14 of the local server; start a private one if none answers.
export CHORUS_TEST_REDIS_URL=${CHORUS_TEST_REDIS_URL:-redis://127.0.0.1:6379/14}
if ! $PY -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()" "$CHORUS_TEST_REDIS_URL" 2>/dev/null; then
  command -v redis-server >/dev/null || { echo "Redis is needed: install redis-server (apt-get install redis-server)"; exit 1; }
  port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --loglevel warning &
  pids+=($!)
  export CHORUS_TEST_REDIS_URL="redis://127.0.0.1:$port/14"
  for _ in $(seq 50); do $PY -c "import redis,sys; redis.Redis.from_url(sys.argv[1]).ping()" "$CHORUS_TEST_REDIS_URL" 2>/dev/null && break; sleep 0.1; done
fi

# Database: DATABASE_URL if set, else the local PostgreSQL if it lets us in, else a SQLite file.
if [ -z "${DATABASE_URL:-}" ]; then
  for url in "postgres://postgres@127.0.0.1:5432/postgres" "postgres:///postgres"; do
    if $PY -c "import psycopg,sys; psycopg.connect(sys.argv[1], connect_timeout=3).close()" "$url" 2>/dev/null; then
      export DATABASE_URL=${url%/postgres}/chorus
      break
    fi
  done
fi
echo "Tests use: database ${DATABASE_URL:-SQLite (var/test_chorus.sqlite3)}, Redis $CHORUS_TEST_REDIS_URL"

.venv/bin/ruff check .
.venv/bin/ruff format --check .
DEBUG=1 DATABASE_URL="sqlite:///:memory:" $PY manage.py makemigrations --check --dry-run
# The deploy checklist with production-like settings: any warning fails the run.
DEBUG=0 DJANGO_SECRET_KEY="$($PY -c 'import secrets; print(secrets.token_urlsafe(50))')" \
  ALLOWED_HOSTS=chorus.example.com CHORUS_HTTPS=1 CHORUS_HSTS_SECONDS=31536000 \
  CHORUS_HSTS_INCLUDE_SUBDOMAINS=1 CHORUS_HSTS_PRELOAD=1 \
  $PY manage.py check --deploy --fail-level WARNING
# The official AG-UI TypeScript client, which tests/test_agui.py and tests/test_api_docs.py run with node:
# installed from tests/agui_client/package-lock.json (again only when the lock file changes).
node_stamp=tests/agui_client/node_modules/.lock.sha
node_want=$(sha256sum tests/agui_client/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$node_stamp" 2>/dev/null)" != "$node_want" ]; then
  echo "Installing tests/agui_client's node packages"
  (cd tests/agui_client && npm ci --no-audit --no-fund --loglevel=error)
  echo "$node_want" > "$node_stamp"
fi
.venv/bin/pytest "$@"
# The integration tests again with every fast path off (docs/performance.md#fast-paths): the library's own path
# beside each one must keep working. The daphnes and workers the tests start inherit CHORUS_FAST_PATHS. Exit
# status 5 is "no test selected" (arguments that name no integration test).
echo "Integration tests again with CHORUS_FAST_PATHS=0"
status=0
# Not the browser tests (what the page does with the frames it gets: the socket tests cover the frames on both
# paths), the schemathesis run of the API against its document (what the API answers, which no fast path
# changes) or the soak (volume, not a path the other tests miss): about half the integration tests' time.
CHORUS_FAST_PATHS=0 CHORUS_UPDATE_DOCS=0 .venv/bin/pytest -m "integration and not browser" \
  --ignore=tests/test_api_schema.py --ignore=tests/test_soak.py "$@" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
