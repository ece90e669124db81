#!/usr/bin/env bash
# The whole chain on the synthetic, FairFace-shaped dataset: generate and pack the data, pretrain the
# demo-size network, finetune in three steps, run the hard-sample branch, then the test harness.
# Prints the table of AUC and bias per step and where the predictions and the report are.
set -eo pipefail
. "$(dirname "$0")/env.sh"
start=$(date +%s)
echo "[demo] existing datasets/demo_* are kept (delete them or run make_demo_data.py --force to rebuild);" \
  "every model, chain-table row and result is redone (SEED=${SEED:-0})"
python data_process/make_demo_data.py --out datasets --seed "${DATA_SEED:-0}"
python data_process/show_record.py --rec datasets/demo_fairface/train.rec --out results/train_records.png --n 64 --shuffle
./shell/train.sh
./shell/fairface_finetune.sh
./shell/fairface_step2_finetune.sh
./shell/fairface_step3_finetune.sh
./shell/hard_sample_step1.sh
./shell/hard_sample_step2.sh
./shell/do.sh
if [ "${DEMO_BENCHMARKS:-0}" = 1 ]; then ./shell/benchmarks_demo.sh; fi
echo
echo "== AUC and bias per step (validation pairs; models/chain_table.md) =="
cat models/chain_table.md
echo
echo "== the submission, scored on the synthetic val set (results/val/report/report.md) =="
python -c 'import json, sys; from recognition.evaluation.report import summary_text; print(summary_text(json.load(open(sys.argv[1]))))' results/val/report/report.json
echo
echo "predictions: $(pwd)/results/test/predictions.csv"
echo "report:      $(pwd)/results/val/report/report.html"
echo "demo finished in $(( $(date +%s) - start )) s"
