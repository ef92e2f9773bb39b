#!/usr/bin/env bash
# Checks of infra/stack.sh itself, against the real servers.
#   while-up:   a second `up` is harmless (same processes, exit 0), status says running
#   after-down: `down` left no server process and no open port
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN=${CHAT_RUN_DIR:-$REPO/.run}
passed=0; failed=0
check() { # NAME CMD...
  local name=$1; shift
  if "$@"; then echo "ok   $name"; passed=$((passed + 1)); else echo "FAIL $name"; failed=$((failed + 1)); fi
}
pids() { cat "$RUN"/*/pid 2>/dev/null | sort | tr '\n' ' '; }
port_closed() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "${1:-}" in
  while-up)
    before=$(pids)
    check "status reports every server running" "$REPO/infra/stack.sh" status
    check "a second infra-up succeeds" "$REPO/infra/stack.sh" up
    after=$(pids)
    check "a second infra-up starts nothing new (pids: $after)" test "$before" = "$after"
    check "three servers are recorded" test "$(echo "$after" | wc -w)" = 3
    # Remember them for the after-down check.
    echo "$after" >"$RUN/.pids-while-up"
    ;;
  after-down)
    recorded=$(cat "$RUN/.pids-while-up" 2>/dev/null)
    for pid in $recorded; do
      check "process $pid is gone" bash -c "! kill -0 $pid 2>/dev/null"
    done
    for port in ${CHAT_KAFKA_PORT:-9092} ${CHAT_CQL_PORT:-9042} ${CHAT_REGISTRY_PORT:-8081}; do
      check "port $port is closed" port_closed "$port"
    done
    check "no java process runs from the stack's cache" bash -c "! pgrep -f 'chat-platform/(kafka|cassandra|apicurio)' >/dev/null"
    rm -f "$RUN/.pids-while-up"
    ;;
  *) echo "usage: $0 while-up|after-down" >&2; exit 2 ;;
esac
echo "infra: $passed passed, $failed failed"
[ "$failed" = 0 ]
