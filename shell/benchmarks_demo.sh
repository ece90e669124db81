#!/usr/bin/env bash
# The standard benchmarks' tools on synthetic sets in their layouts (the demo's optional step,
# DEMO_BENCHMARKS=1 ./shell/demo.sh): IJB-C 1:1 with every model of FINAL_DIR and their fusion, then RFW and
# BFW per model. Real data: the same commands with your IJB_release/IJBC, RFW and BFW folders (README).
set -eo pipefail
. "$(dirname "$0")/env.sh"
FINAL_DIR="${FINAL_DIR:-final_eval_models}"
OUT="${OUT:-results/benchmarks}"
DATASETS="${DATASETS:-datasets}"
REPLICATES="${REPLICATES:-200}"
models=()
for d in "$FINAL_DIR"/*/; do
  if [ -f "$d/model.json" ]; then models+=(--model "${d%/}"); fi
done
if [ ${#models[@]} -eq 0 ]; then echo "error: $FINAL_DIR: no model folders (sub-folders with model.json)" >&2; exit 2; fi
for set in ijbc rfw bfw; do
  python data_process/make_demo_data.py --out "$DATASETS" --seed "${DATA_SEED:-0}" --only "$set"
done
python test/ijb.py --image-path "$DATASETS/demo_ijbc" --result-dir "$OUT/ijbc" "${models[@]}" --bootstrap "$REPLICATES"
python test/bias_benchmarks.py --protocol rfw --root "$DATASETS/demo_rfw" --out "$OUT/rfw" "${models[@]}" \
  --bootstrap "$REPLICATES"
python test/bias_benchmarks.py --protocol bfw --root "$DATASETS/demo_bfw" --out "$OUT/bfw" "${models[@]}" \
  --far 1e-2,1e-1 --bootstrap "$REPLICATES"
echo "benchmarks: $OUT/ (ijbc/IJBC_tar_far.md, rfw.md, bfw.md)"
