#!/usr/bin/env bash
# Finetune step 2: from step 1 (MODELS_ROOT/STEP1_RUN/latest), all layers. Writes
# MODELS_ROOT/STEP2_RUN/latest, a chain-table row and the step-3 group choice. Extra arguments go to train.py.
set -eo pipefail
. "$(dirname "$0")/chain_common.sh"
FROM="$(previous "$MODELS_ROOT/$STEP1_RUN" "step 1 (shell/fairface_finetune.sh)")"
train_step step2 "$STEP2_RUN" "$FAIRFACE_DIR" "$FROM" --freeze-block 0 \
  --lr "${STEP2_LR:-0.01}" --max-steps "${STEP2_STEPS:-200}" --verbose "${STEP2_STEPS:-200}" "$@"
evaluate_step step2 "$(cat "$MODELS_ROOT/$STEP2_RUN/latest")" "$MODELS_ROOT/$STEP2_RUN/protected_group.json"
