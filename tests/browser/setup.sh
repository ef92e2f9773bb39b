#!/usr/bin/env bash
# Installs what the browser test needs, from the project's own files:
# Debian's `chromium` package (when /usr/bin/chromium is missing; needs root
# or sudo) and playwright-core from tests/browser/package-lock.json (`npm ci`).
# No browser is downloaded by npm: the test launches /usr/bin/chromium.
# Idempotent: a second run does nothing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHROMIUM=${CHAT_CHROMIUM:-/usr/bin/chromium}

if [ ! -x "$CHROMIUM" ]; then
  echo "installing Debian's chromium (for the browser test)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
"$CHROMIUM" --version 2>/dev/null | grep -i chromium || { echo "no working $CHROMIUM"; exit 1; }

command -v node >/dev/null || { echo "node (>= 20) is needed for the browser test"; exit 1; }
cd "$HERE"
if [ ! -f node_modules/.package-lock.json ] || ! cmp -s package-lock.json node_modules/.package-lock.json.src 2>/dev/null; then
  # Playwright must not fetch browsers of its own.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json node_modules/.package-lock.json.src
fi
node -e 'require("playwright-core"); console.log("playwright-core", require("playwright-core/package.json").version)'
