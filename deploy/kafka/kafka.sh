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
#   reset   stop the broker and delete its state (topics, offsets, logs, and in secure mode the
#           certificates and passwords); the jar cache is kept
#
# Secure mode (KAFKA_SECURE=1; `make kafka-up-secure` / `make kafka-down-secure`): the client
# listener is SASL_SSL (SCRAM-SHA-512 over TLS) on 127.0.0.1, with the StandardAuthorizer: nothing
# is allowed without an ACL, except to the super user `admin`. On first use it generates, with the
# JDK's keytool only, a throwaway CA and a broker certificate (SAN IP:127.0.0.1, DNS:localhost),
# and random passwords for two SCRAM users, `admin` (super user) and `ner-stream` (no ACLs: grant
# them with deploy/kafka/acls.py); the users are created when the storage is formatted. The
# controller listener (KAFKA_PORT+1) is TLS with client certificates: only the broker's own
# certificate is accepted there. The broker talks to itself (transaction markers) over SASL_SSL as
# `admin`. For clients, it writes into <state dir>/secure/:
#   ca.pem                      the CA certificate (--ssl-cafile)
#   admin.password, ner-stream.password    the users' passwords
#   admin.properties            client settings for Kafka's own tools (--command-config)
#   ner-stream.env              NER_STREAM_* variables for `ner-stream run` as user ner-stream
#
# Environment:
#   KAFKA_PORT           client port on 127.0.0.1 (default 9092, secure mode 9192); the controller
#                        uses KAFKA_PORT+1
#   KAFKA_STATE_DIR      config, data, logs and pid file (default: .state next to this script,
#                        secure mode .state-secure)
#   KAFKA_SECURE         1: secure mode (above); the state folder remembers the mode it was
#                        formatted for and is formatted again when started in the other one
#   KAFKA_START_TIMEOUT  seconds to wait for the broker to answer metadata requests (default 60)
#   KAFKA_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (default 30)
#   KAFKA_HEAP_OPTS      JVM heap flags (default "-Xmx768m -Xms256m")
#   KAFKA_JVM_PERFORMANCE_OPTS  other JVM flags (default "-XX:+UseG1GC -XX:TieredStopAtLevel=1")
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"

HOST=127.0.0.1
case "${KAFKA_SECURE:-0}" in
1 | true | yes) SECURE=1 ;;
0 | false | no | "") SECURE=0 ;;
*)
    echo "kafka.sh: error: KAFKA_SECURE must be 1 or 0, got '$KAFKA_SECURE'" >&2
    exit 1
    ;;
esac
# The secure broker has its own port and state by default, so that it can run beside the plain one.
if ((SECURE)); then
    PORT="${KAFKA_PORT:-9192}"
    DEFAULT_STATE_DIR=".state-secure"
    MODE=sasl_ssl
else
    PORT="${KAFKA_PORT:-9092}"
    DEFAULT_STATE_DIR=".state"
    MODE=plaintext
fi
START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx768m -Xms256m}"
# C1-only JIT: the broker is ready in about half the time on a small machine (7 s instead of 13 s
# on 2 cores), and a local test broker never runs long enough to profit from C2's faster code.
JVM_OPTS="${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:TieredStopAtLevel=1}"

CACHE_DIR="$HERE/.cache"
LIB_DIR="$CACHE_DIR/lib"
LIB_STAMP="$CACHE_DIR/lib.stamp"
STATE_DIR="${KAFKA_STATE_DIR:-$HERE/$DEFAULT_STATE_DIR}"

log() { echo "kafka.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65535)) \
    || die "KAFKA_PORT must be a port number, got '$PORT'"
CONTROLLER_PORT=$((PORT + 1))
BOOTSTRAP="$HOST:$PORT"
SHOWN_MODE=""
((SECURE)) && SHOWN_MODE=" (SASL_SSL)"

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
# Secure mode: certificates, passwords and the client files derived from them.
SECURE_DIR="$STATE_DIR/secure"
CA_PEM="$SECURE_DIR/ca.pem"
STORE_PASSWORD_FILE="$SECURE_DIR/store.password"
BROKER_KEYSTORE="$SECURE_DIR/broker.p12"
BROKER_TRUSTSTORE="$SECURE_DIR/truststore.p12"
ADMIN_PROPERTIES="$SECURE_DIR/admin.properties"
# The principal of the broker's certificate: the controller listener accepts only this one.
BROKER_DN="CN=ner-stream-local-broker"
SCRAM_MECHANISM=SCRAM-SHA-512
SCRAM_USERS=(admin ner-stream)

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

# A random password of 32 hex digits: nothing for a shell, a JAAS file or a properties file to
# quote.
random_secret() {
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n'
}

password_of() {
    cat "$SECURE_DIR/$1.password"
}

# Secure mode, first use: the key stores' password and one password per SCRAM user. The users are
# written into the storage when it is formatted, so new user passwords mean a new format.
ensure_passwords() {
    local user fresh=0
    if [[ ! -s "$STORE_PASSWORD_FILE" ]]; then
        random_secret >"$STORE_PASSWORD_FILE"
        # Key stores locked with another password are of no use: ensure_tls makes new ones.
        rm -f "$BROKER_KEYSTORE" "$BROKER_TRUSTSTORE"
    fi
    for user in "${SCRAM_USERS[@]}"; do
        [[ -s "$SECURE_DIR/$user.password" ]] && continue
        random_secret >"$SECURE_DIR/$user.password"
        fresh=1
    done
    if ((fresh)) && [[ -f "$DATA_DIR/meta.properties" ]]; then
        log "new SCRAM passwords: the storage is formatted again"
        rm -f "$FORMATTED_PORT_FILE"
    fi
}

# Secure mode, first use: a throwaway CA and a broker certificate signed by it, with keytool alone
# (openssl is not needed); to renew them, delete <state dir>/secure/ca.pem and start again. The certificate names 127.0.0.1 and localhost, the addresses clients
# connect to, so that clients verify the host name as well as the CA. Its extended key usage
# allows client authentication too: the broker presents it to its own controller listener.
ensure_tls() {
    [[ -s "$CA_PEM" && -s "$BROKER_KEYSTORE" && -s "$BROKER_TRUSTSTORE" ]] && return
    require keytool "it comes with the JDK (e.g. apt-get install openjdk-17-jdk-headless)"
    log "generating a throwaway CA and broker certificate in $SECURE_DIR (first run only)"
    local pw ca_store="$SECURE_DIR/ca.p12" csr="$SECURE_DIR/broker.csr" crt="$SECURE_DIR/broker.crt"
    pw="$(cat "$STORE_PASSWORD_FILE")"
    rm -f "$ca_store" "$BROKER_KEYSTORE" "$BROKER_TRUSTSTORE" "$CA_PEM" "$csr" "$crt"
    {
        keytool -genkeypair -alias ca -keyalg RSA -keysize 2048 -validity 3650 \
            -dname "CN=ner-stream local test CA" -ext bc:c=ca:true -ext ku:c=keyCertSign,cRLSign \
            -keystore "$ca_store" -storetype PKCS12 -storepass "$pw" -keypass "$pw" &&
            keytool -exportcert -rfc -alias ca -keystore "$ca_store" -storepass "$pw" \
                -file "$CA_PEM" &&
            keytool -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity 3650 \
                -dname "$BROKER_DN" -keystore "$BROKER_KEYSTORE" -storetype PKCS12 \
                -storepass "$pw" -keypass "$pw" &&
            keytool -certreq -alias broker -keystore "$BROKER_KEYSTORE" -storepass "$pw" \
                -file "$csr" &&
            keytool -gencert -alias ca -keystore "$ca_store" -storepass "$pw" -rfc -validity 3650 \
                -infile "$csr" -outfile "$crt" -ext san=ip:127.0.0.1,dns:localhost \
                -ext ku:c=digitalSignature,keyEncipherment -ext eku=serverAuth,clientAuth &&
            keytool -importcert -noprompt -alias ca -file "$CA_PEM" \
                -keystore "$BROKER_KEYSTORE" -storepass "$pw" &&
            keytool -importcert -alias broker -file "$crt" \
                -keystore "$BROKER_KEYSTORE" -storepass "$pw" &&
            keytool -importcert -noprompt -alias ca -file "$CA_PEM" \
                -keystore "$BROKER_TRUSTSTORE" -storetype PKCS12 -storepass "$pw"
    } >"$SECURE_DIR/keytool.log" 2>&1 || {
        cat "$SECURE_DIR/keytool.log" >&2
        rm -f "$CA_PEM" "$BROKER_KEYSTORE" "$BROKER_TRUSTSTORE"
        die "keytool could not create the certificates"
    }
    # The CA's private key is not kept: nothing can be signed by this CA after this.
    rm -f "$ca_store" "$csr" "$crt"
}

# Secure mode: the files clients need, rewritten on every start from the passwords and the CA.
write_client_files() {
    cat >"$ADMIN_PROPERTIES" <<EOF
# Kafka's own tools as the super user admin (--command-config); generated by kafka.sh.
security.protocol=SASL_SSL
sasl.mechanism=$SCRAM_MECHANISM
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(password_of admin)";
ssl.truststore.type=PEM
ssl.truststore.location=$CA_PEM
EOF
    cat >"$SECURE_DIR/ner-stream.env" <<EOF
# ner-stream run as the SCRAM user ner-stream (set -a; . this file; set +a); generated by kafka.sh.
NER_STREAM_BOOTSTRAP_SERVERS=$BOOTSTRAP
NER_STREAM_SECURITY_PROTOCOL=SASL_SSL
NER_STREAM_SASL_MECHANISM=$SCRAM_MECHANISM
NER_STREAM_SASL_USERNAME=ner-stream
NER_STREAM_SASL_PASSWORD=$(password_of ner-stream)
NER_STREAM_SSL_CAFILE=$CA_PEM
EOF
}

# Secure mode: passwords, certificates and client files, all private to the current user.
ensure_secure_files() {
    mkdir -p "$SECURE_DIR"
    chmod 700 "$SECURE_DIR"
    (
        umask 077
        ensure_passwords
        ensure_tls
        write_client_files
    )
}

# A real metadata round trip, not just an open socket: the port opens before the broker has joined
# the quorum and been unfenced. kafka-python from the project's venv is fast; the Java admin tool
# is the fallback on a machine where the venv is not (yet) installed.
metadata_ok() {
    local py="$REPO_ROOT/.venv/bin/python"
    if [[ -x "$py" ]] && "$py" -c "import kafka" 2>/dev/null; then
        timeout 15 "$py" - "$BOOTSTRAP" "$SECURE" "$SECURE_DIR" <<'PY' >/dev/null 2>&1
import sys
from pathlib import Path

from kafka import KafkaAdminClient

security = {}
if sys.argv[2] == "1":
    secure_dir = Path(sys.argv[3])
    security = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "admin",
        "sasl_plain_password": (secure_dir / "admin.password").read_text().strip(),
        "ssl_cafile": str(secure_dir / "ca.pem"),
    }
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=5000, **security)
try:
    # An unfenced broker lists itself; a broker still starting up lists no one.
    sys.exit(0 if admin.describe_cluster().get("brokers") else 1)
finally:
    admin.close()
PY
    else
        local client_conf="$STATE_DIR/probe-client.properties"
        # In secure mode it holds the admin password: readable by this user only.
        (
            umask 077
            printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=8000\n' >"$client_conf"
            if ((SECURE)); then
                cat "$ADMIN_PROPERTIES" >>"$client_conf"
            fi
        )
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

# The listeners of the plain mode: everything PLAINTEXT, no authorizer.
plain_listeners() {
    cat <<EOF
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
}

# The listeners of the secure mode (see the header): SASL_SSL for clients and for the broker's
# requests to itself, TLS with client certificates for the controller, and ACLs.
secure_listeners() {
    local pw
    pw="$(cat "$STORE_PASSWORD_FILE")"
    cat <<EOF
listeners=SASL_SSL://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=$SCRAM_MECHANISM
sasl.mechanism.inter.broker.protocol=$SCRAM_MECHANISM
# The login module's user and password are what the broker itself presents on this listener.
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(password_of admin)";
ssl.keystore.type=PKCS12
ssl.keystore.location=$BROKER_KEYSTORE
ssl.keystore.password=$pw
ssl.key.password=$pw
ssl.truststore.type=PKCS12
ssl.truststore.location=$BROKER_TRUSTSTORE
ssl.truststore.password=$pw
# Only a certificate signed by the throwaway CA (the broker's own) gets onto the controller
# listener. SCRAM cannot protect it: the SCRAM users live in the metadata the controller serves.
listener.name.controller.ssl.client.auth=required
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# admin for people and tools, the certificate's principal for the broker's own controller requests.
super.users=User:admin;User:$BROKER_DN
allow.everyone.if.no.acl.found=false
EOF
}

write_config() {
    local listeners
    if ((SECURE)); then
        listeners="$(secure_listeners)"
    else
        listeners="$(plain_listeners)"
    fi
    # Secure mode: it holds the store and admin passwords.
    (
        umask 077
        write_config_file "$listeners"
    )
}

write_config_file() {
    cat >"$CONF" <<EOF
# Generated by kafka.sh on every start; edit kafka.sh, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
$1
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

# Formats the storage once. The quorum's voter set records the controller endpoint, and the secure
# mode's SCRAM users are written at format time, so a state folder formatted for another KAFKA_PORT
# or mode is wiped and formatted again, not started inconsistently. The file holds the port alone
# for the plain mode (as before the secure mode existed) and "port sasl_ssl" for the secure one.
ensure_formatted() {
    local formatted="" want="$PORT"
    ((SECURE)) && want="$PORT $MODE"
    [[ -f "$FORMATTED_PORT_FILE" ]] && formatted="$(cat "$FORMATTED_PORT_FILE")"
    if [[ -f "$DATA_DIR/meta.properties" && "$formatted" == "$want" ]]; then
        return
    fi
    if [[ -f "$DATA_DIR/meta.properties" ]]; then
        log "storage was formatted for '${formatted:-unknown}', not '$want': wiping $DATA_DIR"
    fi
    rm -rf "$DATA_DIR"
    if [[ ! -s "$CLUSTER_ID_FILE" ]]; then
        kafka_tool kafka.tools.StorageTool random-uuid >"$CLUSTER_ID_FILE"
    fi
    local scram=() user
    if ((SECURE)); then
        for user in "${SCRAM_USERS[@]}"; do
            scram+=(--add-scram "$SCRAM_MECHANISM=[name=$user,password=$(password_of "$user")]")
        done
    fi
    log "formatting storage in $DATA_DIR (cluster id $(cat "$CLUSTER_ID_FILE"))"
    kafka_tool kafka.tools.StorageTool format --standalone -t "$(cat "$CLUSTER_ID_FILE")" \
        -c "$CONF" "${scram[@]}" >"$LOG_DIR/format.log" 2>&1 || {
        cat "$LOG_DIR/format.log" >&2
        die "formatting the storage failed"
    }
    echo "$want" >"$FORMATTED_PORT_FILE"
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
            log "already running (pid $(cat "$PID_FILE")) on $BOOTSTRAP$SHOWN_MODE"
            return 0
        fi
        # Started by a concurrent `up` that has not finished yet: wait for it like it would.
        wait_until_ready "$(cat "$PID_FILE")"
        log "running (pid $(cat "$PID_FILE")) on $BOOTSTRAP$SHOWN_MODE"
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
    if ((SECURE)); then
        ensure_secure_files
    fi
    write_config
    ensure_formatted

    SERVER_LOG_START="$(stat -c %s "$LOG_DIR/server.log" 2>/dev/null || echo 0)"
    log "starting Kafka on $BOOTSTRAP$SHOWN_MODE (controller $HOST:$CONTROLLER_PORT, state $STATE_DIR)"
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
    log "running (pid $(cat "$PID_FILE")) on $BOOTSTRAP$SHOWN_MODE, ready after $((SECONDS - started))s"
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
        echo "running (pid $(cat "$PID_FILE")) on $BOOTSTRAP$SHOWN_MODE"
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
