#!/usr/bin/env bash
# `make run`: runs the platform's services against the local stack (which
# `make infra-up` started): the sequencer, the delivery router, the
# history projector, the presence service, the push projector and the push worker in the background, and one gateway in the foreground
# with the development login on. Ctrl-C stops them all; their logs are in
# .run/services/.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN=${CHAT_RUN_DIR:-$REPO/.run}
BIN=${CHAT_BIN_DIR:-$REPO/target/debug}
LOGS="$RUN/services"
mkdir -p "$LOGS"

pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

for svc in chat-sequencer chat-router chat-history chat-presence chat-push; do
  # The sequencer's and router's state stores persist here across restarts.
  CHAT_STATE__DIR=${CHAT_STATE__DIR:-$RUN/state/$svc} "$BIN/$svc" >"$LOGS/$svc.log" 2>&1 &
  pids+=($!)
  echo "started $svc (pid $!), log: $LOGS/$svc.log"
done

# The push worker, with only the signed webhook on (no provider credentials
# needed; README.md "Push notifications" shows how to enable APNs, FCM, Web Push).
CHAT_PUSH__WEBHOOK__ENABLED=${CHAT_PUSH__WEBHOOK__ENABLED:-true} \
CHAT_PUSH__WEBHOOK__SECRET=${CHAT_PUSH__WEBHOOK__SECRET:-dev-webhook-secret-change-me} \
  "$BIN/chat-push-worker" >"$LOGS/chat-push-worker.log" 2>&1 &
pids+=($!)
echo "started chat-push-worker (pid $!), log: $LOGS/chat-push-worker.log"

PORT=${CHAT_GATEWAY_PORT:-8080}
export CHAT_LISTEN=${CHAT_LISTEN:-127.0.0.1:$PORT}
export CHAT_DEV_LOGIN=${CHAT_DEV_LOGIN:-true}
# A development secret: set CHAT_AUTH__HS256_SECRET (or a JWKS) in production.
export CHAT_AUTH__HS256_SECRET=${CHAT_AUTH__HS256_SECRET:-dev-secret-change-me}
export CHAT_ALLOWED_ORIGINS=${CHAT_ALLOWED_ORIGINS:-[\"http://$CHAT_LISTEN\",\"http://localhost:$PORT\"]}
echo
echo "Chat in the browser: open http://$CHAT_LISTEN/ in two windows (or a normal and a private"
echo "window) and sign in as two users. CLI: target/debug/chat login ann; chat --help."
echo "WebSocket: ws://$CHAT_LISTEN/ws?token=...&device=... (PROTOCOL.md)   health: http://$CHAT_LISTEN/health   metrics: /metrics"
echo "Ctrl-C stops the services; 'make infra-down' stops Kafka, Cassandra and the registry."
echo
"$BIN/chat-gateway" &
pids+=($!)
wait "${pids[-1]}"
