#!/usr/bin/env bash
# Finetune step 1: from the pretrained model, only fc7 trains (--freeze-block 1; fc7 is re-initialised
# when the class count differs). Reads PRETRAINED (prefix,epoch; default: the pretraining run's latest
# pointer), writes MODELS_ROOT/STEP1_RUN/latest and a chain-table row. Extra arguments go to train.py.
set -eo pipefail
. "$(dirname "$0")/chain_common.sh"
FROM="${PRETRAINED:-$(previous "$PRETRAINED_RUN" "pretrained model (shell/train.sh)")}"
mkdir -p "$MODELS_ROOT/$STEP1_RUN"
evaluate_step pretrained "$FROM" "$MODELS_ROOT/$STEP1_RUN/pretrained_group.json"
train_step step1 "$STEP1_RUN" "$FAIRFACE_DIR" "$FROM" --freeze-block 1 \
  --lr "${STEP1_LR:-0.1}" --max-steps "${STEP1_STEPS:-150}" --verbose "${STEP1_STEPS:-150}" "$@"
evaluate_step step1 "$(cat "$MODELS_ROOT/$STEP1_RUN/latest")" "$MODELS_ROOT/$STEP1_RUN/protected_group.json"
