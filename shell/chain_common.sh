# Sourced by the finetune step scripts: demo defaults (each overridable by an environment variable) and
# the helpers every step uses. Relative paths are taken from the project root (env.sh changes to it).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh" || exit 1
MODELS_ROOT="${MODELS_ROOT:-models}"
FAIRFACE_DIR="${FAIRFACE_DIR:-datasets/demo_fairface}"
HARD_DIR="${HARD_DIR:-${FAIRFACE_DIR}_hard}"
VAL_DIR="${VAL_DIR:-$FAIRFACE_DIR/val}"
FINAL_DIR="${FINAL_DIR:-final_eval_models}"
CHAIN_TABLE="${CHAIN_TABLE:-$MODELS_ROOT/chain_table}"
NETWORK="${NETWORK:-demo}"
LOSS="${LOSS:-${DEMO_LOSS:-nsoftmax}}"
DATASET="${DATASET:-demo_fairface}"
CTX="${CTX:-${DEMO_CTX:-cpu:1}}"
BACKEND="${BACKEND:-mxnet}"   # the evaluations' inference backend: mxnet or onnxruntime (README)
SEED="${SEED:-0}"   # every step's --seed: training draws and the chain table's bootstrap resamples
PRETRAINED_RUN="${PRETRAINED_RUN:-$MODELS_ROOT/$NETWORK-$LOSS-demo}"
STEP1_RUN="${STEP1_RUN:-fairface-step1}"
STEP2_RUN="${STEP2_RUN:-fairface-step2}"
STEP3_RUN="${STEP3_RUN:-fairface-step3}"
HARD1_RUN="${HARD1_RUN:-hard-sample-step1}"
HARD2_RUN="${HARD2_RUN:-hard-sample-step2}"

# previous RUN_DIR WHAT: the `prefix,epoch` a finished step left in RUN_DIR/latest, or exit 2.
previous() {
  if [ ! -f "$1/latest" ]; then
    echo "error: $1/latest: no $2 found (run it first, or set the variable that points elsewhere)" >&2
    exit 2
  fi
  cat "$1/latest"
}

# train_step NAME RUN DATA_DIR FROM [train.py args]: finetune FROM into MODELS_ROOT/RUN (checkpoint at
# the last step, pointer MODELS_ROOT/RUN/latest); extra arguments go to train/train.py and win.
train_step() {
  local name="$1" run="$2" data="$3" from="$4"
  shift 4
  local pointer="$MODELS_ROOT/$run/latest"
  echo "[$name] read $from; data $data"
  # The pointer moves aside while the step runs and comes back if it fails: a failed or refused run
  # neither loses the previous good result nor leaves it looking like this run's.
  [ -f "$pointer" ] && mv "$pointer" "$pointer.previous"
  if ! python -u train/train.py --network "$NETWORK" --loss "$LOSS" --dataset "$DATASET" --data-dir "$data" \
      --models-root "$MODELS_ROOT" --run-name "$run" --pretrained "$from" --ckpt 2 --val-targets "" \
      --warmup 0 --lr-steps "" --ctx "$CTX" --seed "$SEED" "$@" || [ ! -f "$pointer" ]; then
    [ -f "$pointer.previous" ] && mv "$pointer.previous" "$pointer"
    echo "error: [$name] training failed; $pointer left as it was" >&2
    exit 2
  fi
  rm -f "$pointer.previous"
  echo "[$name] wrote $(cat "$pointer") ($pointer)"
}

# evaluate_step NAME MODEL OUT_JSON: AUC and bias on the validation pairs, a row of the chain table, and
# the protected-group choice (OUT_JSON) that step 3 reads.
evaluate_step() {
  python train/select_protected_group.py --model "$2" --val-dir "$VAL_DIR" --out "$3" \
    --aligned-dir "$MODELS_ROOT/val_aligned" --table "$CHAIN_TABLE" --step "$1" --ctx "$CTX" --seed "$SEED" --backend "$BACKEND"
}

# install_model RUN_DIR NAME: RUN_DIR's latest checkpoint as the model folder FINAL_DIR/NAME, swapped in whole.
install_model() { python train/install_model.py "$1" "$2" --final-dir "$FINAL_DIR" || exit 2; }
