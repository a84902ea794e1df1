#!/usr/bin/env bash
# The demo behind `make demo`: a local broker, the worker, the bundled sample news, the entities
# as they arrive, a metrics summary; then it stops what it started (the broker only if it was
# not already running).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
KAFKA="$ROOT/deploy/kafka/kafka.sh"
SAMPLES="$ROOT/ner_stream/samples/news.jsonl"
PORT="${DEMO_METRICS_PORT:-9400}"
RUN="demo-$(date +%s)"
WORK="$(mktemp -d)"
WORKER_PID=""
STARTED_KAFKA=0

cleanup() {
  if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
  fi
  if [ "$STARTED_KAFKA" = 1 ]; then "$KAFKA" down || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! "$KAFKA" status >/dev/null 2>&1; then
  STARTED_KAFKA=1
  "$KAFKA" up
fi

export NER_STREAM_BOOTSTRAP_SERVERS=127.0.0.1:${KAFKA_PORT:-9092}
export NER_STREAM_INPUT_TOPIC="$RUN.documents"
export NER_STREAM_OUTPUT_TOPIC="$RUN.entities"
export NER_STREAM_DLQ_TOPIC="$RUN.dlq"
export NER_STREAM_GROUP_ID="$RUN"

echo "== starting the worker (topics $RUN.*, metrics on 127.0.0.1:$PORT)"
"$BIN/ner-stream" run --create-topics --topic-partitions 2 --metrics-port "$PORT" \
  --log-level WARNING >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
ready() {
  "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1
}
for _ in $(seq 1 120); do
  if ready; then break; fi
  if ! kill -0 "$WORKER_PID" 2>/dev/null; then
    echo "the worker exited:"; cat "$WORK/worker.log"; exit 1
  fi
  sleep 0.5
done
ready || { echo "the worker did not become ready:"; cat "$WORK/worker.log"; exit 1; }

TOTAL=$(grep -c . "$SAMPLES")
echo "== producing $TOTAL sample documents"
"$BIN/ner-stream" produce "$SAMPLES"

echo "== entities as they arrive"
"$BIN/ner-stream" consume --pretty --max-messages "$TOTAL" --idle-timeout-s 60

echo "== metrics summary (http://127.0.0.1:$PORT/metrics)"
"$BIN/python" "$ROOT/deploy/metrics_summary.py" "http://127.0.0.1:$PORT/metrics"

echo "== stopping the worker"
kill -TERM "$WORKER_PID"
wait "$WORKER_PID" && echo "worker exited cleanly" || echo "worker exited with $?"
WORKER_PID=""
