#!/usr/bin/env bash
# The demo chain (pretraining, steps 1-3) for N training seeds on the same data, then one table of every
# step's AUC and bias over the seeds, with the paired intervals of step 3 against step 2 and against the
# pretrained model (test/fairness_study.py). About N x 7 minutes on 2 cores; not part of demo.sh or the tests.
#   ./shell/fairness_study.sh [N]            seeds 0..N-1 (default 3)
# STUDY_ROOT (default models/study) holds one chain per seed (seed_<s>/). A stage whose run folder already
# has its `latest` pointer is reused, so an interrupted study continues, and a step-3 recipe is compared on
# the same step-2 models by naming its run:
#   STEP3_RUN=step3-all-layers STEP3_FREEZE=0 ./shell/fairness_study.sh 3
# Every chain variable (STEP3_FREEZE, STEP3_LR, STEP3_STEPS, SELECTED, ...) reaches every seed.
set -eo pipefail
. "$(dirname "$0")/study_common.sh"
N="${1:-3}"
export STEP3_RUN="${STEP3_RUN:-fairface-step3}"
runs=()
for ((s = 0; s < N; s++)); do
  export SEED="$s" MODELS_ROOT="$STUDY_ROOT/seed_$s"
  export FINAL_DIR="$MODELS_ROOT/final_eval_models"
  runs+=("$MODELS_ROOT")
  echo "[study] seed $s -> $MODELS_ROOT"
  stage "$MODELS_ROOT/demo-${DEMO_LOSS:-nsoftmax}-demo" ./shell/train.sh --models-root "$MODELS_ROOT"
  stage "$MODELS_ROOT/fairface-step1" ./shell/fairface_finetune.sh
  stage "$MODELS_ROOT/fairface-step2" ./shell/fairface_step2_finetune.sh
  stage "$MODELS_ROOT/$STEP3_RUN" ./shell/fairface_step3_finetune.sh
done
python test/fairness_study.py --runs "${runs[@]}" --step3-run "$STEP3_RUN" --val-dir "$FAIRFACE_DIR/val" \
  --seed 0 --out "$STUDY_ROOT/study_$STEP3_RUN"
