"""What a private step may say: nothing about its batch. Inside `withheld`, warnings are dropped, every logger is
silenced and Python's stdout and stderr are discarded (a truncation count, a shape, the tokenizer's "sequence length
is longer than ... (36 > 5)" or transformers' underflow detector's activations name rows or the realised Poisson
batch size, and saying it during a step says which batch held the row), and an exception other
than slimtune's own (whose messages name settings and released values only) becomes a one-line SlimtuneError without
its text, which may hold rows. Everything that touches a private batch runs inside it: `slimtune train`'s private
steps, the private Hugging Face trainer's collation and steps, and private federated clients' local steps.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import warnings
from contextlib import contextmanager

from slimtune import SlimtuneError

_silence = {"depth": 0, "previous": logging.NOTSET}  # logging and sys.std* are process-wide: the outermost block
# restores them
_silence_lock = threading.Lock()


@contextmanager
def withheld(failure: str, hint: str = ""):
    """`failure`: what failed, as the user sees it ("a private training step failed at step 3"); `hint`: how to see
    the details outside the guarantee (appended after a colon)."""
    try:
        with silenced():
            yield
    except SlimtuneError:
        raise
    except Exception:
        raise SlimtuneError(f"{failure}; its details are withheld (they may depend on individual training rows)"
                            + (f": {hint}" if hint else "")) from None


@contextmanager
def silenced():
    """No warning, no log line and no print while inside; exceptions pass unchanged (for code that reads every
    training row outside a step, such as the private trainer's held-out check, whose own errors name no row)."""
    with warnings.catch_warnings(), _silent_logging():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _silent_logging():
    """Every logger of every library off (logging.disable) and sys.stdout / sys.stderr discarded while any block is
    inside, back after the last one leaves (blocks may nest, or overlap in threads)."""
    with _silence_lock:
        if _silence["depth"] == 0:
            _silence["previous"] = logging.root.manager.disable
            logging.disable(logging.CRITICAL)
            _silence["streams"] = (sys.stdout, sys.stderr)
            sys.stdout = sys.stderr = _Discard()
        _silence["depth"] += 1
    try:
        yield
    finally:
        with _silence_lock:
            _silence["depth"] -= 1
            if _silence["depth"] == 0:
                logging.disable(_silence["previous"])
                sys.stdout, sys.stderr = _silence.pop("streams")


class _Discard(io.TextIOBase):
    """A text stream that keeps nothing (what a private step prints goes nowhere)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)
