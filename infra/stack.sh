#!/usr/bin/env bash
# Fetches, starts, checks and stops the real servers of the local stack:
#   Apache Kafka (KRaft, one combined node), Apache Cassandra (one node) and
#   Apicurio Registry (kafkasql storage, Confluent-compatible API).
#
# usage: infra/stack.sh fetch|up|down|status|clean|logs NAME|restart NAME
#        (NAME: kafka, cassandra or registry)
#        infra/stack.sh cluster-up|cluster-down|cluster-status|cluster-clean
#        infra/stack.sh cluster-kill N|cluster-start N   (SIGKILL / restart node N)
#        infra/stack.sh cluster-bootstrap|cluster-brokers (its address; brokers registered)
#   The cluster: 3 Kafka nodes (KRaft, broker+controller each) beside the
#   single-node stack, replication 3, min.insync.replicas 2 (fault tests).
#
# Downloads come from Maven Central through `mvn` and are cached outside the
# git tree in $CHAT_CACHE_DIR (default ~/.cache/chat-platform). Every server
# listens on loopback only, keeps its data and log under $CHAT_RUN_DIR
# (default <repo>/.run) and is stopped by the pid recorded there.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INFRA="$REPO/infra"
CACHE=${CHAT_CACHE_DIR:-$HOME/.cache/chat-platform}
RUN=${CHAT_RUN_DIR:-$REPO/.run}

KAFKA_VERSION=4.1.1
CASSANDRA_VERSION=5.0.6
APICURIO_VERSION=3.0.9

KAFKA_PORT=${CHAT_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${CHAT_KAFKA_CONTROLLER_PORT:-9093}
CQL_PORT=${CHAT_CQL_PORT:-9042}
CASSANDRA_STORAGE_PORT=${CHAT_CASSANDRA_STORAGE_PORT:-7000}
CASSANDRA_JMX_PORT=${CHAT_CASSANDRA_JMX_PORT:-7199}
REGISTRY_PORT=${CHAT_REGISTRY_PORT:-8081}

KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
CASSANDRA_HOME="$CACHE/cassandra-$CASSANDRA_VERSION"
APICURIO_HOME="$CACHE/apicurio-registry-$APICURIO_VERSION"

MVN=(mvn -B -q -Dstyle.color=never)
# Maven's local repository (a cache outside the tree, shared with other Maven use).
M2=${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}

say() { printf '[infra] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

require_java() {
  command -v java >/dev/null || die "java not found: install a Java 17 JDK (Debian: apt-get install openjdk-17-jdk-headless)"
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ "${v:-0}" -ge 17 ] || die "Java 17 or newer is needed (found ${v:-none})"
}

# --- fetch ------------------------------------------------------------------

fetch_kafka() {
  [ -f "$KAFKA_HOME/.complete" ] && return 0
  say "fetching Apache Kafka $KAFKA_VERSION from Maven Central"
  rm -rf "$KAFKA_HOME" && mkdir -p "$KAFKA_HOME"
  "${MVN[@]}" -Dmaven.repo.local="$M2" -f "$INFRA/maven/kafka/pom.xml" dependency:copy-dependencies \
    -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/lib"
  touch "$KAFKA_HOME/.complete"
}

fetch_cassandra() {
  [ -f "$CASSANDRA_HOME/.complete" ] && return 0
  say "fetching Apache Cassandra $CASSANDRA_VERSION from Maven Central"
  rm -rf "$CASSANDRA_HOME" && mkdir -p "$CASSANDRA_HOME"
  "${MVN[@]}" -Dmaven.repo.local="$M2" -f "$INFRA/maven/cassandra/pom.xml" dependency:copy-dependencies \
    -Dcassandra.version="$CASSANDRA_VERSION" -DincludeScope=runtime -DoutputDirectory="$CASSANDRA_HOME/lib"
  touch "$CASSANDRA_HOME/.complete"
}

fetch_registry() {
  [ -f "$APICURIO_HOME/.complete" ] && return 0
  say "fetching Apicurio Registry $APICURIO_VERSION from Maven Central"
  # The `all` zip is fetched without its parent POM (which Central does not
  # serve for every release), so `dependency:get` with transitive=false.
  local repo="$M2"
  "${MVN[@]}" -Dmaven.repo.local="$repo" dependency:get \
    -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:zip:all" -Dtransitive=false
  rm -rf "$APICURIO_HOME" && mkdir -p "$APICURIO_HOME"
  (cd "$APICURIO_HOME" && jar xf "$repo/io/apicurio/apicurio-registry-app/$APICURIO_VERSION/apicurio-registry-app-$APICURIO_VERSION-all.zip")
  touch "$APICURIO_HOME/.complete"
}

fetch_all() {
  command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: apt-get install maven)"
  require_java
  fetch_kafka
  fetch_cassandra
  fetch_registry
}

# --- process bookkeeping ----------------------------------------------------

pidfile() { echo "$RUN/$1/pid"; }

running() {
  local pf
  pf=$(pidfile "$1")
  [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

tail_log() {
  say "last lines of $RUN/$1/server.log:"
  tail -n 40 "$RUN/$1/server.log" >&2 || true
}

# wait_until NAME SECONDS CHECK...: polls CHECK until it succeeds, the process dies, or time runs out.
wait_until() {
  local name=$1 secs=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if ! running "$name"; then
      tail_log "$name"
      die "$name exited during start-up"
    fi
    if [ $SECONDS -ge $deadline ]; then
      tail_log "$name"
      die "$name did not become ready within ${secs}s"
    fi
    sleep 1
  done
}

launch() { # NAME CMD...: start detached, record the pid
  local name=$1
  shift
  mkdir -p "$RUN/$name"
  # setsid: the server outlives this script and ignores the caller's terminal signals.
  setsid "$@" >"$RUN/$name/server.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

# --- kafka ------------------------------------------------------------------

kafka_java() {
  "${KAFKA_JAVA[@]}" "$@"
}

# The broker's heap and collector (CHAT_KAFKA_JVM_OPTS overrides them; see
# infra/conf/README.md for the measurement behind the default).
read -r -a KAFKA_JVM_OPTS <<<"${CHAT_KAFKA_JVM_OPTS:--Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20}"
KAFKA_JAVA=(java "${KAFKA_JVM_OPTS[@]}" -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$INFRA/conf/log4j2-kafka.properties" -Dkafka.logs.dir="$RUN/kafka" \
    -cp "$KAFKA_HOME/lib/*")

start_kafka() {
  if running kafka; then say "kafka already running (pid $(cat "$(pidfile kafka)"))"; return 0; fi
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is taken by another process: stop it or set CHAT_KAFKA_PORT"
  mkdir -p "$RUN/kafka"
  local conf="$RUN/kafka/server.properties"
  sed -e "s#@DATA@#$RUN/kafka/data#g" -e "s#@PORT@#$KAFKA_PORT#g" -e "s#@CONTROLLER_PORT@#$KAFKA_CONTROLLER_PORT#g" \
    "$INFRA/conf/kafka.properties" >"$conf"
  if [ ! -f "$RUN/kafka/data/meta.properties" ]; then
    say "formatting Kafka storage"
    kafka_java kafka.tools.StorageTool format --standalone -t "$(kafka_java kafka.tools.StorageTool random-uuid)" \
      -c "$conf" >"$RUN/kafka/format.log" 2>&1 || { cat "$RUN/kafka/format.log" >&2; die "kafka storage format failed"; }
  fi
  say "starting kafka on 127.0.0.1:$KAFKA_PORT"
  launch kafka "${KAFKA_JAVA[@]}" kafka.Kafka "$conf"
}

kafka_ready() { grep -q "Kafka Server started" "$RUN/kafka/server.log" 2>/dev/null && port_open "$KAFKA_PORT"; }

# --- kafka cluster (3 nodes) ------------------------------------------------
# A local 3-node KRaft cluster beside the single-node stack, for fault tests:
# every node is a combined broker+controller, the three controllers are one
# static voter set (controller.quorum.voters), replication 3 and
# min.insync.replicas 2 (infra/conf/kafka-cluster.properties). Node N
# listens on CLUSTER_BASE_PORT + 2(N-1) (broker) and the port after it
# (controller): 19092/19093, 19094/19095, 19096/19097 by default. Data and
# logs under $RUN/cluster/kafka-N; pids recorded there like the stack's.

CLUSTER_NODES=3
CLUSTER_BASE_PORT=${CHAT_CLUSTER_BASE_PORT:-19092}
CLUSTER_HEAP=${CHAT_CLUSTER_HEAP:-384m}

cluster_port() { echo $((CLUSTER_BASE_PORT + 2 * ($1 - 1))); }
cluster_controller_port() { echo $((CLUSTER_BASE_PORT + 2 * ($1 - 1) + 1)); }
cluster_name() { echo "cluster/kafka-$1"; }

cluster_list() { # FORMAT: 'voters' (1@127.0.0.1:19093,...) or 'bootstrap' (127.0.0.1:19092,...)
  local out="" n
  for n in $(seq 1 "$CLUSTER_NODES"); do
    if [ "$1" = voters ]; then
      out+="${out:+,}$n@127.0.0.1:$(cluster_controller_port "$n")"
    else
      out+="${out:+,}127.0.0.1:$(cluster_port "$n")"
    fi
  done
  echo "$out"
}

cluster_node_arg() { # N: validates a node number
  [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] && [ "$1" -le "$CLUSTER_NODES" ] || die "node must be 1..$CLUSTER_NODES (got '${1:-}')"
}

# A short-lived JVM for Kafka's command-line tools (log4j2's default
# configuration: errors only, so stdout carries only the tool's answer).
kafka_tool() { java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -cp "$KAFKA_HOME/lib/*" "$@"; }

start_cluster_node() {
  local n=$1 name port cport dir conf
  name=$(cluster_name "$n")
  port=$(cluster_port "$n")
  cport=$(cluster_controller_port "$n")
  if running "$name"; then say "kafka-$n already running (pid $(cat "$(pidfile "$name")"))"; return 0; fi
  port_open "$port" && die "port $port is taken by another process: stop it or set CHAT_CLUSTER_BASE_PORT"
  port_open "$cport" && die "port $cport is taken by another process: stop it or set CHAT_CLUSTER_BASE_PORT"
  dir="$RUN/$name"
  mkdir -p "$dir"
  conf="$dir/server.properties"
  sed -e "s#@NODE_ID@#$n#g" -e "s#@DATA@#$dir/data#g" -e "s#@PORT@#$port#g" \
    -e "s#@CONTROLLER_PORT@#$cport#g" -e "s#@VOTERS@#$(cluster_list voters)#g" \
    "$INFRA/conf/kafka-cluster.properties" >"$conf"
  if [ ! -f "$dir/data/meta.properties" ]; then
    # Every node's storage carries the same cluster id; the voters are static
    # (controller.quorum.voters), so no --initial-controllers is needed.
    say "formatting kafka-$n storage (cluster id $(cat "$RUN/cluster/cluster.id"))"
    kafka_tool kafka.tools.StorageTool format -t "$(cat "$RUN/cluster/cluster.id")" -c "$conf" \
      >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "kafka-$n storage format failed"; }
  fi
  say "starting kafka-$n on 127.0.0.1:$port (controller $cport)"
  # A small heap: three nodes share two cores with the rest of the box.
  launch "$name" java -Xms128m "-Xmx$CLUSTER_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$INFRA/conf/log4j2-kafka.properties" \
    -Dkafka.logs.dir="$dir" -cp "$KAFKA_HOME/lib/*" kafka.Kafka "$conf"
}

cluster_node_ready() {
  grep -q "Kafka Server started" "$RUN/$(cluster_name "$1")/server.log" 2>/dev/null && port_open "$(cluster_port "$1")"
}

# How many brokers a metadata request to the cluster lists.
cluster_registered() {
  kafka_tool org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "$(cluster_list bootstrap)" 2>/dev/null |
    grep -c ' (id: ' || true
}

cluster_all_registered() { [ "$(cluster_registered)" -ge "$CLUSTER_NODES" ]; }

cluster_up() {
  command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: apt-get install maven)"
  require_java
  fetch_kafka
  mkdir -p "$RUN/cluster"
  local t0=$SECONDS n
  if [ ! -f "$RUN/cluster/cluster.id" ]; then
    kafka_tool kafka.tools.StorageTool random-uuid | tail -n 1 >"$RUN/cluster/cluster.id"
  fi
  grep -qE '^[A-Za-z0-9_-]{22}$' "$RUN/cluster/cluster.id" ||
    die "$RUN/cluster/cluster.id does not hold a cluster id: remove it (infra/stack.sh cluster-clean)"
  for n in $(seq 1 "$CLUSTER_NODES"); do start_cluster_node "$n"; done
  for n in $(seq 1 "$CLUSTER_NODES"); do
    wait_until "$(cluster_name "$n")" 120 cluster_node_ready "$n"
    say "kafka-$n ready"
  done
  wait_until "$(cluster_name 1)" 60 cluster_all_registered
  say "cluster up in $((SECONDS - t0))s: $CLUSTER_NODES brokers registered, bootstrap $(cluster_list bootstrap)"
}

cluster_down() {
  # SIGTERM to every node at once: a node stopped alone while the others
  # wait would hold its controlled shutdown until the quorum answers.
  local n name pid pids=()
  for n in $(seq "$CLUSTER_NODES" -1 1); do
    name=$(cluster_name "$n")
    if running "$name"; then
      pid=$(cat "$(pidfile "$name")")
      say "stopping kafka-$n (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 30)) alive
  while :; do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    if [ $SECONDS -ge $deadline ]; then
      say "cluster did not stop within 30s: killing"
      for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
      sleep 0.5
      break
    fi
    sleep 0.5
  done
  for n in $(seq 1 "$CLUSTER_NODES"); do rm -f "$(pidfile "$(cluster_name "$n")")"; done
}

cluster_status() {
  local rc=0 n name
  for n in $(seq 1 "$CLUSTER_NODES"); do
    name=$(cluster_name "$n")
    if running "$name"; then
      printf 'kafka-%s    running (pid %s, rss %s KiB) 127.0.0.1:%s controller %s\n' "$n" "$(cat "$(pidfile "$name")")" \
        "$(ps -o rss= -p "$(cat "$(pidfile "$name")")" | tr -d ' ')" "$(cluster_port "$n")" "$(cluster_controller_port "$n")"
    else
      printf 'kafka-%s    stopped (127.0.0.1:%s)\n' "$n" "$(cluster_port "$n")"
      rc=3
    fi
  done
  return $rc
}

cluster_kill() { # N: SIGKILL, no shutdown at all (a crash)
  cluster_node_arg "$1"
  local name pid
  name=$(cluster_name "$1")
  running "$name" || die "kafka-$1 is not running"
  pid=$(cat "$(pidfile "$name")")
  say "SIGKILL kafka-$1 (pid $pid)"
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$(pidfile "$name")"
}

cluster_start() { # N: start one node (after cluster-kill) and wait until it serves
  cluster_node_arg "$1"
  [ -f "$RUN/cluster/cluster.id" ] || die "no cluster here: run cluster-up first"
  local t0=$SECONDS
  start_cluster_node "$1"
  wait_until "$(cluster_name "$1")" 120 cluster_node_ready "$1"
  say "kafka-$1 ready in $((SECONDS - t0))s"
}

# --- cassandra --------------------------------------------------------------

start_cassandra() {
  if running cassandra; then say "cassandra already running (pid $(cat "$(pidfile cassandra)"))"; return 0; fi
  port_open "$CQL_PORT" && die "port $CQL_PORT is taken by another process: stop it or set CHAT_CQL_PORT"
  local dir="$RUN/cassandra"
  mkdir -p "$dir/conf"
  sed -e "s#@DIR@#$dir#g" -e "s#@CQL_PORT@#$CQL_PORT#g" -e "s#@STORAGE_PORT@#$CASSANDRA_STORAGE_PORT#g" \
    "$INFRA/conf/cassandra.yaml" >"$dir/conf/cassandra.yaml"
  cp "$INFRA/conf/logback-cassandra.xml" "$dir/conf/logback.xml"
  local opts=()
  mapfile -t opts < <(grep -vE '^\s*(#|$)' "$INFRA/conf/cassandra-jvm17.options")
  say "starting cassandra on 127.0.0.1:$CQL_PORT"
  launch cassandra java "${opts[@]}" \
    -Dcassandra.config="file://$dir/conf/cassandra.yaml" \
    -Dlogback.configurationFile="$dir/conf/logback.xml" \
    -Dcassandra.logdir="$dir" -Dcassandra.storagedir="$dir/data" \
    -Dcassandra-foreground=yes -Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT" \
    -cp "$CASSANDRA_HOME/lib/*" org.apache.cassandra.service.CassandraDaemon
}

cassandra_ready() { grep -q "Startup complete" "$RUN/cassandra/server.log" 2>/dev/null && port_open "$CQL_PORT"; }

# --- registry ---------------------------------------------------------------

start_registry() {
  if running registry; then say "registry already running (pid $(cat "$(pidfile registry)"))"; return 0; fi
  port_open "$REGISTRY_PORT" && die "port $REGISTRY_PORT is taken by another process: stop it or set CHAT_REGISTRY_PORT"
  say "starting apicurio registry on 127.0.0.1:$REGISTRY_PORT (kafkasql storage)"
  mkdir -p "$RUN/registry"
  launch registry java -Xms128m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.profile=prod \
    -Dapicurio.storage.kind=kafkasql \
    -Dapicurio.kafkasql.bootstrap.servers="127.0.0.1:$KAFKA_PORT" \
    -Dapicurio.kafkasql.topic=chat.registry.journal \
    -Dapicurio.kafkasql.snapshots.topic=chat.registry.snapshots \
    -Dapicurio.ccompat.legacy-id-mode.enabled=true \
    -Dapicurio.ccompat.use-canonical-hash=true \
    -Dapicurio.rest.deletion.artifact.enabled=true \
    -Dapicurio.rest.deletion.artifact-version.enabled=true \
    -Dquarkus.log.level=INFO \
    -jar "$APICURIO_HOME/apicurio-registry-app-$APICURIO_VERSION-runner.jar"
}

registry_ready() {
  # HTTP answers before the kafkasql journal is replayed; until then the
  # registry would not know the schemas it already holds.
  grep -q "KafkaSQL storage bootstrapped" "$RUN/registry/server.log" 2>/dev/null &&
  curl -fsS "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" >/dev/null 2>&1
}

# --- commands ---------------------------------------------------------------

up() {
  fetch_all
  mkdir -p "$RUN"
  local t0=$SECONDS
  # Cassandra is the slowest to start: launch it first, then Kafka, then the
  # registry (which stores its data in Kafka).
  start_cassandra
  start_kafka
  wait_until kafka 90 kafka_ready
  say "kafka ready"
  start_registry
  wait_until registry 120 registry_ready
  say "registry ready"
  wait_until cassandra 180 cassandra_ready
  say "cassandra ready"
  say "stack up in $((SECONDS - t0))s: kafka 127.0.0.1:$KAFKA_PORT, cql 127.0.0.1:$CQL_PORT, registry http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7"
}

stop_one() {
  local name=$1 pf pid
  pf=$(pidfile "$name")
  [ -f "$pf" ] || return 0
  pid=$(cat "$pf")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name did not stop within 30s: killing"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
  fi
  rm -f "$pf"
}

down() {
  # The registry first (it is a Kafka client), Kafka last.
  stop_one registry
  stop_one cassandra
  stop_one kafka
}

status() {
  local rc=0 name
  for name in kafka cassandra registry; do
    if running "$name"; then
      printf '%-10s running (pid %s, rss %s KiB)\n' "$name" "$(cat "$(pidfile "$name")")" \
        "$(ps -o rss= -p "$(cat "$(pidfile "$name")")" | tr -d ' ')"
    else
      printf '%-10s stopped\n' "$name"
      rc=3
    fi
  done
  return $rc
}

case "${1:-}" in
  fetch) fetch_all ;;
  up) up ;;
  down) down ;;
  status) status ;;
  logs) tail -n "${LINES_:-60}" "$RUN/${2:?name: kafka|cassandra|registry}/server.log" ;;
  restart)
    case "${2:-}" in
      registry) stop_one registry; start_registry; wait_until registry 120 registry_ready ;;
      kafka) stop_one kafka; start_kafka; wait_until kafka 90 kafka_ready ;;
      cassandra) stop_one cassandra; start_cassandra; wait_until cassandra 180 cassandra_ready ;;
      *) die "restart what? kafka|cassandra|registry" ;;
    esac
    say "$2 restarted" ;;
  clean) down && cluster_down && rm -rf "$RUN" ;;
  cluster-up) cluster_up ;;
  cluster-down) cluster_down ;;
  cluster-status) cluster_status ;;
  cluster-kill) cluster_kill "${2:-}" ;;
  cluster-start) cluster_start "${2:-}" ;;
  cluster-bootstrap) cluster_list bootstrap ;;
  cluster-brokers) cluster_registered ;;
  cluster-clean) cluster_down && rm -rf "$RUN/cluster" ;;
  *) echo "usage: $0 fetch|up|down|status|logs NAME|restart NAME|clean|cluster-up|cluster-down|cluster-status|cluster-kill N|cluster-start N|cluster-bootstrap|cluster-brokers|cluster-clean" >&2; exit 2 ;;
esac
