"""Export trained models for other runtimes: GGUF (llama.cpp, Ollama)."""

from slimtune.export.gguf import OUT_TYPES, export_gguf

__all__ = ["OUT_TYPES", "export_gguf"]
