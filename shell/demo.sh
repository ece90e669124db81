#!/usr/bin/env bash
# The whole chain on the synthetic dataset.
set -eo pipefail
. "$(dirname "$0")/env.sh"
echo "demo: nothing to run yet"
