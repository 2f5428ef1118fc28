"""Training: the label-word objective, the loop, checkpoints and metrics."""

from slimtune.train.trainer import Run, TrainConfig, prepare, train

__all__ = ["Run", "TrainConfig", "prepare", "train"]
