#!/usr/bin/env bash
# Multi-process / multi-machine training on MXNet's parameter server.
#   ./shell/launch_dist.sh -n 2 -s 1 -- python train/train.py --kvstore dist_sync --dataset demo --network demo
#   ./shell/launch_dist.sh -n 8 -s 2 --launcher ssh --hostfile hosts --env CUDA_VISIBLE_DEVICES -- python train/train.py ...
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec python train/launch_dist.py "$@"
