"""What a private step may say: nothing about its batch. Inside `withheld`, warnings are dropped and every logger is
silenced (a truncation count, a shape or the tokenizer's "sequence length is longer than ... (36 > 5)" names rows or
the realised Poisson batch size, and saying it during a step says which batch held the row), and an exception other
than slimtune's own (whose messages name settings and released values only) becomes a one-line SlimtuneError without
its text, which may hold rows. Everything that touches a private batch runs inside it: `slimtune train`'s private
steps, the private Hugging Face trainer's collation and steps, and private federated clients' local steps.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager

from slimtune import SlimtuneError

_silence = {"depth": 0, "previous": logging.NOTSET}  # logging is process-wide: the outermost block restores it
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
    """No warning and no log line while inside; exceptions pass unchanged (for code that reads every training row
    outside a step, such as the private trainer's held-out check, whose own errors name no row)."""
    with warnings.catch_warnings(), _silent_logging():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _silent_logging():
    """Every logger of every library off (logging.disable) while any block is inside, back to its level after the
    last one leaves (blocks may nest, or overlap in threads)."""
    with _silence_lock:
        if _silence["depth"] == 0:
            _silence["previous"] = logging.root.manager.disable
            logging.disable(logging.CRITICAL)
        _silence["depth"] += 1
    try:
        yield
    finally:
        with _silence_lock:
            _silence["depth"] -= 1
            if _silence["depth"] == 0:
                logging.disable(_silence["previous"])
