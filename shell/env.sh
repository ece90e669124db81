# Source me: creates .venv with Python 3.11 if missing, installs the requirements when they changed,
# and activates it. MXNet 1.9.1 with numpy 1.23 has no wheels for Python 3.12+.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="${FAIRFACE_REQUIREMENTS:-$ROOT/requirements.txt}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(command -v python3.11 || true)"
  if [ -z "$PY" ]; then
    echo "error: Python 3.11 not found (MXNet 1.9.1 needs Python <= 3.11); install python3.11 and retry" >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "[env] creating $VENV with $PY"
  "$PY" -m venv "$VENV" || { echo "error: could not create $VENV" >&2; return 1 2>/dev/null || exit 1; }
fi
STAMP="$VENV/.requirements.sha"
WANT="$(basename "$REQ") $(cat "$REQ" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$HAVE" != "$WANT" ]; then
  # mxnet and mxnet-cu112 both own the mxnet/ package: switching flavour must remove the other one.
  if [ -n "$HAVE" ] && [ "${HAVE%% *}" != "${WANT%% *}" ]; then
    "$VENV/bin/pip" uninstall -q -y mxnet mxnet-cu112 >/dev/null 2>&1
  fi
  echo "[env] installing $(basename "$REQ") into $VENV"
  "$VENV/bin/pip" install -q -r "$REQ" && "$VENV/bin/pip" install -q --no-deps -e "$ROOT" \
    && echo "$WANT" > "$STAMP" \
    || { echo "error: pip install of $REQ failed" >&2; return 1 2>/dev/null || exit 1; }
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PYTHONUNBUFFERED=1
# insightface's recommended engine settings.
export MXNET_ENGINE_TYPE="${MXNET_ENGINE_TYPE:-ThreadedEnginePerDevice}"
export MXNET_SAFE_ACCUMULATION="${MXNET_SAFE_ACCUMULATION:-1}"
# Keep MXNet and matplotlib from writing outside the project on shared machines.
export MPLBACKEND="${MPLBACKEND:-Agg}"
cd "$ROOT" || return 1
