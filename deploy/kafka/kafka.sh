#!/usr/bin/env bash
# Local single-node Apache Kafka broker (KRaft, combined broker + controller) run from Maven Central
# jars, for tests and demos on a machine without Docker. Only Java 17+ and Maven are needed.
#
# Usage: kafka.sh up | down | status | reset
#
#   up      resolve the jars (first run only), format storage (first run only), start the broker in
#           the background and return once a client can fetch metadata; quick no-op when already up
#   down    stop the broker (SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT seconds)
#   status  print "running ..." (exit 0) or "stopped" (exit 3)
#   reset   stop the broker and delete its state (topics, offsets, logs); the jar cache is kept
#
# Environment:
#   KAFKA_PORT           client port on 127.0.0.1 (default 9092); the controller uses KAFKA_PORT+1
#   KAFKA_STATE_DIR      config, data, logs and pid file (default: .state next to this script)
#   KAFKA_START_TIMEOUT  seconds to wait for the broker to answer metadata requests (default 60)
#   KAFKA_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (default 30)
#   KAFKA_HEAP_OPTS      JVM heap flags (default "-Xmx768m -Xms256m")
#   KAFKA_JVM_PERFORMANCE_OPTS  other JVM flags (default "-XX:+UseG1GC -XX:TieredStopAtLevel=1")
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"

HOST=127.0.0.1
PORT="${KAFKA_PORT:-9092}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx768m -Xms256m}"
# C1-only JIT: the broker is ready in about half the time on a small machine (7 s instead of 13 s
# on 2 cores), and a local test broker never runs long enough to profit from C2's faster code.
JVM_OPTS="${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:TieredStopAtLevel=1}"

CACHE_DIR="$HERE/.cache"
LIB_DIR="$CACHE_DIR/lib"
LIB_STAMP="$CACHE_DIR/lib.stamp"
STATE_DIR="${KAFKA_STATE_DIR:-$HERE/.state}"

log() { echo "kafka.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65535)) \
    || die "KAFKA_PORT must be a port number, got '$PORT'"
CONTROLLER_PORT=$((PORT + 1))
BOOTSTRAP="$HOST:$PORT"

# The state folder may come from the environment as a relative path; the broker and the pid checks
# below need one absolute spelling of it.
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
CONF="$STATE_DIR/server.properties"
DATA_DIR="$STATE_DIR/data"
LOG_DIR="$STATE_DIR/logs"
PID_FILE="$STATE_DIR/kafka.pid"
CLUSTER_ID_FILE="$STATE_DIR/cluster.id"
FORMATTED_PORT_FILE="$STATE_DIR/formatted.port"
# Marks a folder as created by this script, so that `reset` never deletes a folder it does not own.
STATE_MARKER="$STATE_DIR/.kafka-sh-state"

require() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH; $2"
}

require_java() {
    require java "install a JDK 17 or newer (e.g. apt-get install openjdk-17-jdk-headless)"
    local version
    version="$(java -XshowSettings:properties -version 2>&1 \
        | sed -n 's/^ *java.specification.version = //p')"
    [[ "${version%%.*}" =~ ^[0-9]+$ ]] && ((${version%%.*} >= 17)) \
        || die "Kafka 4 needs Java 17 or newer, found '${version:-unknown}' at $(command -v java)"
}

# Copies the broker's runtime jar closure into .cache/lib. The stamp holds the pom's checksum, so
# the download happens once, and again only when pom.xml changes (e.g. a new Kafka version).
ensure_jars() {
    local want
    want="$(sha256sum <"$HERE/pom.xml" | cut -d' ' -f1)"
    if [[ -d "$LIB_DIR" && -f "$LIB_STAMP" && "$(cat "$LIB_STAMP")" == "$want" ]]; then
        return
    fi
    require mvn "install Apache Maven (needed once, to download the Kafka jars)"
    log "resolving Kafka jars with Maven into $LIB_DIR (first run only) ..."
    mkdir -p "$CACHE_DIR"
    local tmp="$CACHE_DIR/lib.partial"
    rm -rf "$tmp"
    if ! mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$CACHE_DIR/mvn.log" 2>&1; then
        tail -n 40 "$CACHE_DIR/mvn.log" >&2
        die "Maven could not resolve the Kafka jars (full log: $CACHE_DIR/mvn.log)"
    fi
    # Swap in the complete folder only now: an interrupted download is never mistaken for a cache.
    rm -rf "$LIB_DIR"
    mv "$tmp" "$LIB_DIR"
    echo "$want" >"$LIB_STAMP"
}

# Runs a Kafka command-line class; its own log output goes to a file rather than the terminal.
kafka_tool() {
    java -cp "$LIB_DIR/*" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
        -Dkafka.logs.dir="$LOG_DIR/tools" "$@"
}

# True while the process exists and is not a zombie: where nothing reaps the detached broker, a
# stopped one would otherwise still answer kill -0.
pid_running() {
    kill -0 "$1" 2>/dev/null || return 1
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

# True when the pid file names a live process that is this state folder's broker. Checking the
# command line guards against a stale pid file whose number was reused by another process.
broker_alive() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] && pid_running "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "kafka.Kafka $CONF"
}

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# A real metadata round trip, not just an open socket: the port opens before the broker has joined
# the quorum and been unfenced. kafka-python from the project's venv is fast; the Java admin tool
# is the fallback on a machine where the venv is not (yet) installed.
metadata_ok() {
    local py="$REPO_ROOT/.venv/bin/python"
    if [[ -x "$py" ]] && "$py" -c "import kafka" 2>/dev/null; then
        timeout 15 "$py" - "$BOOTSTRAP" <<'PY' >/dev/null 2>&1
import sys

from kafka import KafkaAdminClient

admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=5000)
try:
    # An unfenced broker lists itself; a broker still starting up lists no one.
    sys.exit(0 if admin.describe_cluster().get("brokers") else 1)
finally:
    admin.close()
PY
    else
        local client_conf="$STATE_DIR/probe-client.properties"
        printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=8000\n' >"$client_conf"
        timeout 20 java -cp "$LIB_DIR/*" org.apache.kafka.tools.TopicCommand \
            --bootstrap-server "$BOOTSTRAP" --command-config "$client_conf" --list >/dev/null 2>&1
    fi
}

# server.log is appended to across starts; SERVER_LOG_START (its size before this start) keeps
# lines of earlier runs out of the tail printed on failure.
SERVER_LOG_START=0

print_log_tail() {
    if [[ -s "$LOG_DIR/kafka.out" ]]; then
        echo "----- last lines of $LOG_DIR/kafka.out -----" >&2
        tail -n 40 "$LOG_DIR/kafka.out" >&2
    fi
    if [[ -s "$LOG_DIR/server.log" ]]; then
        echo "----- last lines of $LOG_DIR/server.log (this start) -----" >&2
        tail -c +$((SERVER_LOG_START + 1)) "$LOG_DIR/server.log" | tail -n 40 >&2
    fi
}

write_config() {
    cat >"$CONF" <<EOF
# Generated by kafka.sh on every start; edit kafka.sh, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$DATA_DIR

# One broker: every internal topic must make do with a single replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the default 50: a single local broker gains nothing from them, and
# the first group join / transaction is faster.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
share.coordinator.state.topic.num.partitions=4

# Tests start consumer groups often; do not wait 3 s for more members before the first rebalance.
group.initial.rebalance.delay.ms=0
num.partitions=1
# Kept at Kafka's default (true) so that ad-hoc demos can produce to a new topic; the tests create
# their topics explicitly with the partition count they need.
auto.create.topics.enable=true
EOF
}

# Formats the storage once. The quorum's voter set records the controller endpoint, so a state
# folder formatted for another KAFKA_PORT is wiped and formatted again, not started inconsistently.
ensure_formatted() {
    local formatted_port=""
    [[ -f "$FORMATTED_PORT_FILE" ]] && formatted_port="$(cat "$FORMATTED_PORT_FILE")"
    if [[ -f "$DATA_DIR/meta.properties" && "$formatted_port" == "$PORT" ]]; then
        return
    fi
    if [[ -f "$DATA_DIR/meta.properties" ]]; then
        log "storage was formatted for port ${formatted_port:-unknown}, not $PORT: wiping $DATA_DIR"
    fi
    rm -rf "$DATA_DIR"
    if [[ ! -s "$CLUSTER_ID_FILE" ]]; then
        kafka_tool kafka.tools.StorageTool random-uuid >"$CLUSTER_ID_FILE"
    fi
    log "formatting storage in $DATA_DIR (cluster id $(cat "$CLUSTER_ID_FILE"))"
    kafka_tool kafka.tools.StorageTool format --standalone -t "$(cat "$CLUSTER_ID_FILE")" \
        -c "$CONF" >"$LOG_DIR/format.log" 2>&1 || {
        cat "$LOG_DIR/format.log" >&2
        die "formatting the storage failed"
    }
    echo "$PORT" >"$FORMATTED_PORT_FILE"
}

# Waits for the broker with pid $1 to serve metadata. On timeout it is stopped when $2 is "stop"
# (this call started it: nothing half-started is left behind), else left running for its owner.
wait_until_ready() {
    local pid="$1" on_timeout="${2:-keep}" deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! pid_running "$pid"; then
            print_log_tail
            rm -f "$PID_FILE"
            die "the broker exited during start-up (logs in $LOG_DIR)"
        fi
        if port_open "$PORT" && metadata_ok; then
            return 0
        fi
        sleep 0.5
    done
    print_log_tail
    if [[ "$on_timeout" == stop ]]; then
        cmd_down
        die "the broker did not answer metadata requests on $BOOTSTRAP within ${START_TIMEOUT}s;" \
            "stopped it (logs in $LOG_DIR)"
    fi
    die "the broker did not answer metadata requests on $BOOTSTRAP within ${START_TIMEOUT}s" \
        "(still running as pid $pid; stop it with: $0 down)"
}

cmd_up() {
    if broker_alive; then
        if port_open "$PORT"; then
            log "already running (pid $(cat "$PID_FILE")) on $BOOTSTRAP"
            return 0
        fi
        # Started by a concurrent `up` that has not finished yet: wait for it like it would.
        wait_until_ready "$(cat "$PID_FILE")"
        log "running (pid $(cat "$PID_FILE")) on $BOOTSTRAP"
        return 0
    fi
    rm -f "$PID_FILE"

    require_java
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        if port_open "$p"; then
            die "port $HOST:$p is already in use by a process not started by this script;" \
                "stop it or choose another KAFKA_PORT"
        fi
    done
    ensure_jars

    mkdir -p "$LOG_DIR"
    touch "$STATE_MARKER"
    write_config
    ensure_formatted

    SERVER_LOG_START="$(stat -c %s "$LOG_DIR/server.log" 2>/dev/null || echo 0)"
    log "starting Kafka on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, state $STATE_DIR)"
    # setsid detaches the broker from the caller's session, so Ctrl-C in `make` or the end of a
    # pytest run does not take it down; only `kafka.sh down` stops it. The wrapper shell writes its
    # own pid and then becomes java, so the pid file names the JVM itself. The lock descriptor (9)
    # is closed for it: a broker holding the lock would block every later kafka.sh call.
    # shellcheck disable=SC2086  # HEAP_OPTS and JVM_OPTS hold several JVM flags on purpose
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka-broker "$PID_FILE" \
        java $HEAP_OPTS $JVM_OPTS -Djava.awt.headless=true \
        -Dkafka.logs.dir="$LOG_DIR" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
        -cp "$LIB_DIR/*" kafka.Kafka "$CONF" \
        </dev/null >"$LOG_DIR/kafka.out" 2>&1 9>&- &
    # The wrapper writes the pid file a moment after the fork.
    local i
    for i in $(seq 50); do
        [[ -s "$PID_FILE" ]] && break
        sleep 0.1
    done
    [[ -s "$PID_FILE" ]] || die "the broker process did not start (see $LOG_DIR/kafka.out)"

    local started=$SECONDS
    wait_until_ready "$(cat "$PID_FILE")" stop
    log "running (pid $(cat "$PID_FILE")) on $BOOTSTRAP, ready after $((SECONDS - started))s"
}

cmd_down() {
    if ! broker_alive; then
        rm -f "$PID_FILE"
        log "not running"
        return 0
    fi
    local pid
    pid="$(cat "$PID_FILE")"
    log "stopping broker (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while pid_running "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if pid_running "$pid"; then
        log "no exit after ${STOP_TIMEOUT}s: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while pid_running "$pid"; do
            sleep 0.1
        done
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    if broker_alive; then
        echo "running (pid $(cat "$PID_FILE")) on $BOOTSTRAP"
    else
        echo "stopped"
        return 3
    fi
}

cmd_reset() {
    cmd_down
    if [[ -f "$STATE_MARKER" ]]; then
        rm -rf "$STATE_DIR"
        log "deleted $STATE_DIR"
    else
        log "$STATE_DIR was not created by kafka.sh; leaving it alone"
    fi
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
    up | down | status | reset) ;;
    *)
        echo "usage: $0 up|down|status|reset" >&2
        exit 2
        ;;
    esac
    # Serialise concurrent invocations on one state folder (e.g. `make test` and a test fixture),
    # so that two `up`s never start two brokers.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$STATE_DIR/.lock"
        flock 9
    fi
    "cmd_$cmd"
}

main "$@"
