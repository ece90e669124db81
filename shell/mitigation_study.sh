#!/usr/bin/env bash
# Bias mitigation, compared honestly: from each seed's step-2 model, the seed's step 3 and every mitigation
# switch, then the post-hoc calibrations of step 2's scores; one table of AUC, TAR@FAR, the bias measures and
# the worst group, each with its paired bootstrap interval against step 2, on the held-out test split (the
# post-hoc methods are fitted on val, so val would flatter them). Not part of demo.sh or the tests.
#   ./shell/mitigation_study.sh [N]          seeds 0..N-1 (default 3)
# The chains are shell/fairness_study.sh's (STUDY_ROOT, default models/study, seed_<s>/): a stage whose run
# folder has its `latest` pointer is reused, so the two studies share pretraining and steps 1-3.
# MARGIN (default 0.3): the m2 the step-2 worst group gets with --group-margin (the others keep the preset's).
# FPR_WEIGHT (default 1): the --fpr-penalty weight. K (default 8): the clusters of --fsn and --faircal.
set -eo pipefail
. "$(dirname "$0")/study_common.sh"
N="${1:-3}"
MARGIN="${MARGIN:-0.3}" FPR_WEIGHT="${FPR_WEIGHT:-1}" K="${K:-8}"
TEST_DIR="$FAIRFACE_DIR/test"
landmarks=()
[ -f "$TEST_DIR/landmarks.txt" ] && landmarks=(--landmarks "$TEST_DIR/landmarks.txt")
predict() {   # predict NAME MODEL_FOLDER [test/predict.py switches]: test-split predictions of one model
  local name="$1" model="$2"; shift 2
  local out="$MODELS_ROOT/mitigation/$name/predictions.csv"
  [ -f "$out" ] && [ "$out" -nt "$model/model.json" ] && return 0
  python test/predict.py --images "$TEST_DIR/images" --template "$TEST_DIR/predictions.csv" --models "$model" \
    --out "$out" --aligned-dir "$MODELS_ROOT/test_aligned" "${landmarks[@]}" --seed "$SEED" "$@"
}
runs=()
for ((s = 0; s < N; s++)); do
  export SEED="$s" MODELS_ROOT="$STUDY_ROOT/seed_$s"
  export FINAL_DIR="$MODELS_ROOT/final_eval_models"
  MITIGATION_DIR="$MODELS_ROOT/mitigation_models"
  runs+=("$MODELS_ROOT")
  echo "[mitigation] seed $s -> $MODELS_ROOT"
  stage "$MODELS_ROOT/demo-${DEMO_LOSS:-nsoftmax}-demo" ./shell/train.sh --models-root "$MODELS_ROOT"
  stage "$MODELS_ROOT/fairface-step1" ./shell/fairface_finetune.sh
  stage "$MODELS_ROOT/fairface-step2" ./shell/fairface_step2_finetune.sh
  STEP3_RUN=fairface-step3 stage "$MODELS_ROOT/fairface-step3" ./shell/fairface_step3_finetune.sh
  STEP3_RUN=step3-balanced FINAL_DIR="$MITIGATION_DIR" FINAL_NAME=step3-balanced \
    stage "$MODELS_ROOT/step3-balanced" ./shell/fairface_step3_finetune.sh --sampler balanced
  FINAL_DIR="$MITIGATION_DIR" stage "$MODELS_ROOT/balanced" ./shell/fairface_mitigation_step.sh balanced \
    --sampler balanced
  GROUP="$(python -c 'import sys; from recognition.groups import read_group_choice as r; print(r(sys.argv[1]))' \
    "$MODELS_ROOT/fairface-step2/protected_group.json")"
  FINAL_DIR="$MITIGATION_DIR" stage "$MODELS_ROOT/group-margin" ./shell/fairface_mitigation_step.sh group-margin \
    --group-margin "$GROUP=$MARGIN"
  FINAL_DIR="$MITIGATION_DIR" stage "$MODELS_ROOT/fpr-penalty" ./shell/fairface_mitigation_step.sh fpr-penalty \
    --fpr-penalty "$FPR_WEIGHT"
  for step in fairface-step2 fairface-step3; do
    [ "$MITIGATION_DIR/$step/model.json" -nt "$MODELS_ROOT/$step/latest" ] || \
      python train/install_model.py "$MODELS_ROOT/$step" "$step" --final-dir "$MITIGATION_DIR"
  done
  for name in fairface-step2 fairface-step3 step3-balanced balanced group-margin fpr-penalty; do
    predict "$name" "$MITIGATION_DIR/$name"
  done
  predict "fsn" "$MITIGATION_DIR/fairface-step2" --fsn "$K"
  predict "faircal" "$MITIGATION_DIR/fairface-step2" --faircal "$K"
done
python test/mitigation_study.py --runs "${runs[@]}" --split-dir "$TEST_DIR" --reference fairface-step2 \
  --methods fairface-step3 step3-balanced balanced group-margin fpr-penalty fsn faircal \
  --seed 0 --out "$STUDY_ROOT/mitigation_study"
