#!/usr/bin/env bash
# The seed's test/do.sh, kept where insightface-style users look for it: the harness is shell/do.sh.
exec "$(dirname "$0")/../shell/do.sh" "$@"
