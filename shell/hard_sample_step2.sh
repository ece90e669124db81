#!/usr/bin/env bash
# Hard-sample branch, step 2: from hard-sample step 1, all layers on the mined set (HARD_DIR); the result
# goes to FINAL_DIR/hard_sample_train (the model test/do.sh switches to). Extra arguments go to train.py.
set -eo pipefail
. "$(dirname "$0")/chain_common.sh"
FROM="$(previous "$MODELS_ROOT/$HARD1_RUN" "hard-sample step 1 (shell/hard_sample_step1.sh)")"
train_step hard2 "$HARD2_RUN" "$HARD_DIR" "$FROM" --freeze-block 0 \
  --lr "${HARD2_LR:-0.01}" --max-steps "${HARD2_STEPS:-150}" --verbose "${HARD2_STEPS:-150}" "$@"
evaluate_step hard2 "$(cat "$MODELS_ROOT/$HARD2_RUN/latest")" "$MODELS_ROOT/$HARD2_RUN/protected_group.json"
install_model "$MODELS_ROOT/$HARD2_RUN" "${HARD_NAME:-hard_sample_train}"
