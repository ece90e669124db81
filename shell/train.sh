#!/usr/bin/env bash
# Pretraining, as insightface's train.sh. With datasets/faces_emore present: r100 + ArcFace on MS1M
# (4 GPUs by default, CUDA_VISIBLE_DEVICES to change). Without it: the demo-size network on the synthetic
# set (built first if missing) on CPU in a few minutes. Extra arguments go to train/train.py; CTX (demo:
# cpu:1) and SEED (default 0) are its --ctx and --seed.
set -eo pipefail
. "$(dirname "$0")/env.sh"
export MXNET_ENGINE_TYPE=ThreadedEnginePerDevice
export MXNET_SAFE_ACCUMULATION=1
if [ -f datasets/faces_emore/train.rec ]; then
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1,2,3}"
  echo "[train] datasets/faces_emore found: r100 arcface emore on GPUs $CUDA_VISIBLE_DEVICES"
  python -u train/train.py --network r100 --loss arcface --dataset emore --seed "${SEED:-0}" "$@"
else
  if [ ! -f datasets/demo_emore/train.rec ]; then
    echo "[train] datasets/faces_emore not found; building the synthetic datasets/demo_emore"
    python data_process/make_demo_data.py --only emore --seed "${DATA_SEED:-0}"
  fi
  echo "[train] demo preset on datasets/demo_emore (CPU, demo-size network; use --network r50/r100 for real data)"
  python -u train/train.py --network demo --loss "${DEMO_LOSS:-nsoftmax}" --dataset demo \
    --ctx "${CTX:-${DEMO_CTX:-cpu:1}}" --seed "${SEED:-0}" "$@"
fi
