"""What a private step may say: nothing about its batch. Inside `withheld`, warnings are dropped and every logger is
silenced (a truncation count, a shape or the tokenizer's "sequence length is longer than ... (36 > 5)" names rows or
the realised Poisson batch size, and saying it during a step says which batch held the row), and an exception other
than slimtune's own (whose messages name settings and released values only) becomes a one-line SlimtuneError without
its text, which may hold rows. Everything that touches a private batch runs inside it: `slimtune train`'s private
steps, the private Hugging Face trainer's collation and steps, and private federated clients' local steps.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

from slimtune import SlimtuneError


@contextmanager
def withheld(failure: str, hint: str = ""):
    """`failure`: what failed, as the user sees it ("a private training step failed at step 3"); `hint`: how to see
    the details outside the guarantee (appended after a colon). Logging is back at its previous level after the
    block (blocks may nest)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # every logger, any library: transformers', tokenizers', opacus', ...
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except SlimtuneError:
        raise
    except Exception:
        raise SlimtuneError(f"{failure}; its details are withheld (they may depend on individual training rows)"
                            + (f": {hint}" if hint else "")) from None
    finally:
        logging.disable(previous)
