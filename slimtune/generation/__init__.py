"""Generation: prompt -> completion data (plain, table or chat), the completion-only token loss, decoding with
`transformers.generate`, and BLEU / ROUGE-L / EM / F1 metrics."""

from slimtune.generation.data import GenerationExample, GenerationTask, generation_task, group_references
from slimtune.generation.decode import DecodeSettings, generate_texts
from slimtune.generation.metrics import generation_metrics
from slimtune.generation.objective import encode_generation, per_example_generation_losses

__all__ = ["GenerationExample", "GenerationTask", "generation_task", "group_references", "DecodeSettings",
           "generate_texts", "generation_metrics", "encode_generation", "per_example_generation_losses"]
