#!/usr/bin/env bash
# Hard-sample branch, step 1: mine the training rec with MINE_MODEL's fc7 (default: finetune step 2, the
# finetuned model, as in the seed), write the hard set to HARD_DIR/train.*, then finetune the pretrained
# (not finetuned) model on it with only fc7 training. Extra arguments go to train.py.
set -eo pipefail
. "$(dirname "$0")/chain_common.sh"
MINE_MODEL="${MINE_MODEL:-$(previous "$MODELS_ROOT/$STEP2_RUN" "step 2 (shell/fairface_step2_finetune.sh), whose fc7 mines")}"
FROM="${PRETRAINED:-$(previous "$PRETRAINED_RUN" "pretrained model (shell/train.sh)")}"
echo "[hard1] read $MINE_MODEL (miner) and $FAIRFACE_DIR/train.rec"
python train/mine_hard_samples.py --model "$MINE_MODEL" --rec "$FAIRFACE_DIR/train.rec" \
  --out "$HARD_DIR/train" --ctx "$CTX"
train_step hard1 "$HARD1_RUN" "$HARD_DIR" "$FROM" --freeze-block 1 \
  --lr "${HARD1_LR:-0.1}" --max-steps "${HARD1_STEPS:-100}" --verbose "${HARD1_STEPS:-100}" "$@"
evaluate_step hard1 "$(cat "$MODELS_ROOT/$HARD1_RUN/latest")" "$MODELS_ROOT/$HARD1_RUN/protected_group.json"
