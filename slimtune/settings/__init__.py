"""Every command's settings as a validated dataclass; the CLI flags and config-file keys are generated from them."""

from slimtune.settings.base import Settings, setting
from slimtune.settings.commands import (DemoSettings, EvalSettings, ExportSettings, GenerateSettings, MergeSettings,
                                        PlanSettings, ReportSettings)
from slimtune.settings.train import TrainSettings

__all__ = ["Settings", "setting", "TrainSettings", "EvalSettings", "GenerateSettings", "MergeSettings",
           "ExportSettings", "PlanSettings", "ReportSettings", "DemoSettings"]
