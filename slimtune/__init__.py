"""slimtune: fine-tune language models when memory and privacy are the constraints."""

__version__ = "0.1.0"


class SlimtuneError(Exception):
    """A user-facing error: the message says what is wrong and where (file, line, field)."""
