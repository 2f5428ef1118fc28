"""Data: read user files (TSV/CSV/JSONL) or HF datasets, turn rows into prompts with label words, sample batches."""

from slimtune.data.readers import read_examples
from slimtune.data.sampling import EpochSampler, PoissonSampler, k_shot
from slimtune.data.tasks import TASKS, Example, Task, get_task

__all__ = ["read_examples", "EpochSampler", "PoissonSampler", "k_shot", "TASKS", "Example", "Task", "get_task"]
