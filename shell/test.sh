#!/usr/bin/env bash
# Set up the environment (first run installs), then run the test suite.
set -eo pipefail
. "$(dirname "$0")/env.sh"
python -m pytest tests "$@"
