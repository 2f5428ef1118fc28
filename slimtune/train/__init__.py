"""Training: the label-word objective, the loop, checkpoints and metrics.

The module is also callable: `slimtune.train(data=..., optimizer=..., out=...)` runs `slimtune train` from Python
(slimtune/api.py `train`), while `slimtune.train.prepare` / `slimtune.train.train` stay the two steps it is made of.
"""

import sys
import types

from slimtune.train.trainer import Run, TrainConfig, prepare, train

__all__ = ["Run", "TrainConfig", "prepare", "train"]


class _CallableModule(types.ModuleType):
    def __call__(self, config=None, **settings):
        """`slimtune.train(**settings)`: see `slimtune.api.train`."""
        from slimtune.api import train as train_from_settings
        return train_from_settings(config, **settings)


sys.modules[__name__].__class__ = _CallableModule
