# Sourced by the multi-seed studies (fairness_study.sh, mitigation_study.sh): the demo sets they share and
# `stage`, which reuses a finished run so an interrupted study continues.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh" || exit 1
STUDY_ROOT="${STUDY_ROOT:-models/study}"
export FAIRFACE_DIR="${FAIRFACE_DIR:-datasets/demo_fairface}"
if [ ! -f "$FAIRFACE_DIR/train.rec" ] || [ ! -f datasets/demo_emore/train.rec ]; then
  python data_process/make_demo_data.py --out datasets --seed "${DATA_SEED:-0}"
fi
stage() {   # stage RUN_FOLDER COMMAND...: run COMMAND unless RUN_FOLDER/latest exists
  local folder="$1"; shift
  if [ -f "$folder/latest" ]; then
    echo "[study] seed $SEED: reusing $folder ($(cat "$folder/latest"))"
  else
    "$@"
  fi
}
