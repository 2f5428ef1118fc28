"""Model loading: local HF checkpoints, the embedded SmolLM2 default, tiny random models for tests."""

from slimtune.models.loading import DEFAULT_MODEL, bos_prefix, load_model_and_tokenizer, tiny_tokenizer

__all__ = ["DEFAULT_MODEL", "bos_prefix", "load_model_and_tokenizer", "tiny_tokenizer"]
