#!/usr/bin/env bash
# `make test`: brings up what the tests need, runs every test, and leaves
# nothing running that it started.
#
#   1. installs the third-party Python client into tests/py/.venv, and what
#      the browser test needs (tests/browser/setup.sh: Debian's chromium when
#      /usr/bin/chromium is missing, playwright-core with `npm ci`);
#   2. starts the real stack (infra/stack.sh up) while the tests compile;
#   3. runs the infra checks, then every cargo test in the workspace
#      (unit tests and the end-to-end tests in tests/ against the stack);
#   4. stops the stack if this script started it, and checks that no server
#      process is left.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
RUN=${CHAT_RUN_DIR:-$REPO/.run}

step() { printf '\n==> %s\n' "$*"; }
fail=0

step "python test dependencies"
make -s py-deps || exit 1
export CHAT_PYTHON="$REPO/tests/py/.venv/bin/python"

step "browser test dependencies (chromium, playwright-core)"
bash tests/browser/setup.sh || exit 1

started_stack=0
if ! infra/stack.sh status >/dev/null 2>&1; then
  started_stack=1
fi
cleanup() {
  if [ "$started_stack" = 1 ]; then
    step "stopping the stack this run started"
    infra/stack.sh down
    bash tests/infra_checks.sh after-down || fail=1
  fi
}
trap cleanup EXIT

step "starting the stack (in the background) and compiling the tests"
infra/stack.sh up >"$REPO/.stack-up.log" 2>&1 &
up_pid=$!
# The end-to-end tests start the workspace's binaries: build them all first.
cargo build --workspace --bins --locked && cargo test --workspace --no-run --locked || { wait $up_pid; exit 1; }
if ! wait $up_pid; then
  cat "$REPO/.stack-up.log"
  exit 1
fi
cat "$REPO/.stack-up.log"; rm -f "$REPO/.stack-up.log"

step "infra checks"
bash tests/infra_checks.sh while-up || fail=1

step "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast -- --test-threads=4 || fail=1

if [ "$fail" != 0 ]; then
  step "FAILED"
  exit 1
fi
step "all tests passed"
