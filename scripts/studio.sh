#!/usr/bin/env bash
# Set up (first time only) and open the studio in the browser at http://127.0.0.1:7860
# Extra arguments go to `studio`, e.g.: bash scripts/studio.sh --port 8000   or   --share
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/studio "$@"
