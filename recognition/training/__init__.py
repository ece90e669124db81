"""The trainer behind `train/train.py`: loop, schedules, kvstore/context set-up, logging."""
from recognition.training.loop import TrainingDiverged, TrainingSession, freeze, run_folder, train

__all__ = ['TrainingDiverged', 'TrainingSession', 'freeze', 'run_folder', 'train']
