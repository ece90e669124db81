#!/usr/bin/env bash
# A mitigation step in place of step 3: from step 2, the whole FairFace set (every identity), step 3's
# schedule (STEP3_FREEZE, STEP3_LR, STEP3_STEPS), plus the train/train.py switches given, e.g.
#   ./shell/fairface_mitigation_step.sh mitigation-balanced --sampler balanced
#   ./shell/fairface_mitigation_step.sh mitigation-fpr-penalty --fpr-penalty 1
# Evaluated on the validation pairs like every step (a chain-table row naming the methods), then installed
# as FINAL_DIR/<RUN>. shell/mitigation_study.sh runs one per method.
set -eo pipefail
. "$(dirname "$0")/chain_common.sh"
RUN="${1:?usage: fairface_mitigation_step.sh RUN [train/train.py switches]}"
shift
FROM="$(previous "$MODELS_ROOT/$STEP2_RUN" "step 2 (shell/fairface_step2_finetune.sh)")"
train_step "$RUN" "$RUN" "$FAIRFACE_DIR" "$FROM" --freeze-block "${STEP3_FREEZE:-2}" \
  --lr "${STEP3_LR:-0.01}" --max-steps "${STEP3_STEPS:-100}" --verbose "${STEP3_STEPS:-100}" "$@"
evaluate_step "$RUN" "$(cat "$MODELS_ROOT/$RUN/latest")" "$MODELS_ROOT/$RUN/protected_group.json"
install_model "$MODELS_ROOT/$RUN" "${FINAL_NAME:-$RUN}"
