#!/usr/bin/env bash
# The test harness (the seed's test/do.sh): align, embed with every model in final_eval_models/, fuse,
# re-rank, gap-cut; predictions.csv for the test split, and the accuracy/bias report for the val split.
#   DATA=datasets/fairface MODELS=final_eval_models OUT=results ./shell/do.sh
# FUSION: switch (the hard-sample model where it is sure, default when one is present) | mean | concat.
# POST: post-processing flags for test/predict.py (default: the seed's "--rerank --gap-cut").
# POSTHOC: post-hoc fair calibration flags for test/predict.py, e.g. "--fsn 8" or "--faircal 8" (default none):
#   fitted on the val split first (state $OUT/val/predictions.calibration.npz), then the same state is applied
#   to test with --calibration-state.
# SEED (default 0): the seed of the report's bootstrap resamples and of the post-hoc k-means.
set -eo pipefail
. "$(dirname "$0")/env.sh"
DATA="${DATA:-datasets/demo_fairface}"
MODELS="${MODELS:-final_eval_models}"
OUT="${OUT:-results}"
POST="${POST---rerank --gap-cut}"
if [ -z "$FUSION" ]; then
  FUSION=mean
  if [ "$(find "$MODELS" -mindepth 2 -maxdepth 2 -name model.json 2>/dev/null | wc -l)" -gt 1 ] \
     && find "$MODELS" -mindepth 1 -maxdepth 1 -type d -name '*hard*' | grep -q .; then
    FUSION=switch
  fi
fi
splits="test val" val_state=""
[ -n "$POSTHOC" ] && splits="val test"  # the calibration is fitted on val, then applied to test
for split in $splits; do
  [ -d "$DATA/$split/images" ] || { echo "do.sh: $DATA/$split/images not found, skipping $split"; continue; }
  landmarks=()
  [ -f "$DATA/$split/landmarks.txt" ] && landmarks=(--landmarks "$DATA/$split/landmarks.txt")
  posthoc=()
  # shellcheck disable=SC2206
  if [ -n "$val_state" ]; then posthoc=(--calibration-state "$val_state"); elif [ -n "$POSTHOC" ]; then posthoc=($POSTHOC --seed "${SEED:-0}"); fi
  echo "[do] $split: models $MODELS, fusion $FUSION, post-processing '${POST}'${POSTHOC:+, post-hoc ${posthoc[*]}}"
  # shellcheck disable=SC2086
  python test/predict.py --images "$DATA/$split/images" --template "$DATA/$split/predictions.csv" \
    --models "$MODELS" --out "$OUT/$split/predictions.csv" "${landmarks[@]}" --fusion "$FUSION" $POST "${posthoc[@]}"
  [ -n "$POSTHOC" ] && [ "$split" = val ] && val_state="$OUT/val/predictions.calibration.npz"
  if [ -f "$DATA/$split/ground_truth.csv" ]; then
    python test/evaluate.py --predictions "$OUT/$split/predictions.csv" \
      --ground-truth "$DATA/$split/ground_truth.csv" --metadata "$DATA/$split/metadata.csv" --out "$OUT/$split/report" \
      --seed "${SEED:-0}"
  fi
done
echo "[do] predictions: $OUT/test/predictions.csv"
[ -f "$OUT/val/report/report.html" ] && echo "[do] report: $OUT/val/report/report.html"
exit 0
