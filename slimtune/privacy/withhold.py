"""What a private step may say: nothing about its batch. Inside `withheld`, warnings are dropped (a truncation count
or a shape names rows or the realised Poisson batch size) and an exception other than slimtune's own (whose messages
name settings and released values only) becomes a one-line SlimtuneError without its text, which may hold rows.
Used by `slimtune train`'s private steps, the private Hugging Face trainer and private federated clients.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from slimtune import SlimtuneError


@contextmanager
def withheld(failure: str, hint: str = ""):
    """`failure`: what failed, as the user sees it ("a private training step failed at step 3"); `hint`: how to see
    the details outside the guarantee (appended after a colon)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except SlimtuneError:
        raise
    except Exception:
        raise SlimtuneError(f"{failure}; its details are withheld (they may depend on individual training rows)"
                            + (f": {hint}" if hint else "")) from None
