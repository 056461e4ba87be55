#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite, browser tests included.
# Browser tests drive Debian's headless Chromium; it is installed here when missing (needs root/apt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "test: could not install chromium; browser tests will fail" >&2
  else
    echo "test: install chromium (apt-get install chromium) for the browser tests" >&2
  fi
fi
# The slowest tests are listed at the end, so the suite's time can be kept in check.
exec .venv/bin/python -m pytest -q --durations=25 "$@"
