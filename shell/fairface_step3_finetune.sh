#!/usr/bin/env bash
# Finetune step 3: from step 2, only the identities of the most discriminated protected group, lower lr.
# The group is SELECTED if set (dark_female, gender=0,skin_colour=1, 1, ...), else the choice written by
# step 2's evaluation (train/select_protected_group.py). The result goes to FINAL_DIR/<group>_3_steps_finetune.
# STEP3_FREEZE defaults to 2 (body and its BatchNorm statistics fixed, embedding head + fc7 train): with all
# layers (the seed's 0) the BN statistics drift to the one group and on the demo AUC fell 0.894 -> 0.845.
set -eo pipefail
. "$(dirname "$0")/chain_common.sh"
FROM="$(previous "$MODELS_ROOT/$STEP2_RUN" "step 2 (shell/fairface_step2_finetune.sh)")"
CHOICE="$MODELS_ROOT/$STEP2_RUN/protected_group.json"
if [ -n "${SELECTED:-}" ]; then
  GROUP="$SELECTED"; SPEC="$SELECTED"
else
  if [ ! "$CHOICE" -nt "$MODELS_ROOT/$STEP2_RUN/latest" ]; then
    python train/select_protected_group.py --model "$FROM" --val-dir "$VAL_DIR" --out "$CHOICE" \
      --aligned-dir "$MODELS_ROOT/val_aligned" --ctx "$CTX" --backend "$BACKEND"
  fi
  GROUP="$(python -c 'import sys; from recognition.groups import read_group_choice as r; print(r(sys.argv[1]))' "$CHOICE")"
  SPEC="auto:$CHOICE"
  echo "[step3] read the group choice $GROUP from $CHOICE"
fi
train_step step3 "$STEP3_RUN" "$FAIRFACE_DIR" "$FROM" --freeze-block "${STEP3_FREEZE:-2}" --selected-attributes "$SPEC" \
  --lr "${STEP3_LR:-0.01}" --max-steps "${STEP3_STEPS:-100}" --verbose "${STEP3_STEPS:-100}" "$@"
# Another STEP3_RUN (a recipe or a mitigation of the studies) is its own chain-table row, named by its run.
STEP_NAME=step3
[ "$STEP3_RUN" = fairface-step3 ] || STEP_NAME="$STEP3_RUN"
evaluate_step "$STEP_NAME" "$(cat "$MODELS_ROOT/$STEP3_RUN/latest")" "$MODELS_ROOT/$STEP3_RUN/protected_group.json"
install_model "$MODELS_ROOT/$STEP3_RUN" "${FINAL_NAME:-$(echo "$GROUP" | tr ' =,-' '____')_3_steps_finetune}"
