"""Install a run's latest checkpoint as a model folder of the evaluation harness.

    python train/install_model.py models/fairface-step3 hard_sample_train --final-dir final_eval_models

FINAL_DIR/NAME gets model-symbol.json, model-NNNN.params and model.json, swapped in whole
(`recognition.model_folder.install_model`); the finetune step scripts end with it.
"""
import argparse

from recognition.model_folder import install_model
from recognition.utils import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('run_dir', help='run folder with a latest pointer (prefix,epoch)')
    p.add_argument('name', help='model folder name under --final-dir')
    p.add_argument('--final-dir', default='final_eval_models', help='folder of model folders')
    args = p.parse_args(argv)
    dest, prefix, epoch = install_model(args.run_dir, args.name, args.final_dir)
    print(f'[install] wrote {dest}/ (from {prefix},{epoch})')
    return 0


if __name__ == '__main__':
    run_cli(main)
