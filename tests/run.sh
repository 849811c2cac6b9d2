#!/usr/bin/env bash
# Run the test suite against a real Redis: the one answering on 127.0.0.1:6379 if any, else a
# redis-server started here on a free port (stopped on exit). Tests use their own database number.
set -euo pipefail
cd "$(dirname "$0")/.."
started=""
if [ -z "${ADVERSA_TEST_REDIS_URL:-}" ]; then
  if .venv/bin/python -c "import redis, sys; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=2).ping()" 2>/dev/null; then
    export ADVERSA_TEST_REDIS_URL="redis://127.0.0.1:6379/15"
  elif command -v redis-server >/dev/null; then
    port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    dir=$(mktemp -d)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
      --maxmemory-policy noeviction --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    started="$dir"
    export ADVERSA_TEST_REDIS_URL="redis://127.0.0.1:$port/15"
  else
    echo "no Redis on 127.0.0.1:6379 and no redis-server: the tests start the embedded one" >&2
  fi
fi
cleanup() { if [ -n "$started" ]; then kill "$(cat "$started/redis.pid")" 2>/dev/null || true; rm -rf "$started"; fi; }
trap cleanup EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
