"""What a private step may say: nothing about its batch. Inside `withheld`, warnings are dropped, every logger is
silenced and Python's stdout and stderr are discarded (a truncation count, a shape, the tokenizer's "sequence length
is longer than ... (36 > 5)" or transformers' underflow detector's activations name rows or the realised Poisson
batch size, and saying it during a step says which batch held the row), and an exception other
than slimtune's own (whose messages name settings and released values only) becomes a one-line SlimtuneError without
its text, which may hold rows. Everything that touches a private batch runs inside it: `slimtune train`'s private
steps, the private Hugging Face trainer's collation and steps, and private federated clients' local steps.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import warnings
from contextlib import contextmanager

from slimtune import SlimtuneError

_silence = {"depth": 0, "previous": logging.NOTSET}  # logging and warnings are process-wide: the outermost block
# (of any thread) restores them
_silence_lock = threading.Lock()
_inside = threading.local()  # this thread's depth of private blocks: its prints are dropped while above 0
_public_dummies: set[int] = set()  # non-Python threads seen writing while no private block was active


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
    training row outside a step, such as the private trainer's held-out check, whose own errors name no row).
    Logging and warnings are off for the whole process while any thread is inside (they are process-wide), back as
    they were when the last block leaves; what this thread, a thread started from inside a block and a thread that
    is not Python's write to sys.stdout / sys.stderr is dropped (`_dropped`); threads that were running before (a
    progress display's, a server's) pass."""
    _install_stream_filters()
    with _silence_lock:
        if _silence["depth"] == 0:
            _silence["previous"] = logging.root.manager.disable
            logging.disable(sys.maxsize)  # every level, custom ones above CRITICAL too
            _silence["filters"] = warnings.filters[:]
            warnings.simplefilter("ignore")
        _silence["depth"] += 1
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        yield
    finally:
        _inside.depth -= 1
        with _silence_lock:
            _silence["depth"] -= 1
            if _silence["depth"] == 0:
                logging.disable(_silence["previous"])
                warnings.filters[:] = _silence.pop("filters")
                warnings._filters_mutated()


@contextmanager
def kept_random_state(seed: int | None = None):
    """The process's global random generators (torch's CPU generator, numpy's legacy one, Python's `random`) left as
    they were before the block, and, with `seed`, seeded from it inside (a public value: a collator's masking or
    augmentation is part of the loss, not of the privacy mechanism). Code touching private rows (a random collator
    over a Poisson batch, which draws once per token) moves them by an amount that depends on the rows; a later public
    step drawing from them (an evaluation's masking) would then depend on the rows too."""
    import random

    import numpy as np
    import torch

    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        if seed is not None:
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def unsilenced(stream):
    """The stream under this module's filter (and under a progress display's proxy over it): sys.stderr for a
    message that must reach the user even from inside a private block, such as the Ctrl-C handler's
    acknowledgement, which names no row."""
    while True:
        if isinstance(stream, _PrivateAware):
            stream = stream.wrapped
        elif getattr(stream, "rich_proxied_file", None) is not None:  # rich Live's FileProxy over sys.std*
            stream = stream.rich_proxied_file
        else:
            return stream


def _install_stream_filters() -> None:
    """sys.stdout and sys.stderr as _PrivateAware filters over what they are now (once per stream object; never
    taken out again, so a redirect made and undone by another thread meanwhile cannot leave a stream dropped; also at
    import, so a non-Python thread's writes before the first block are seen), and, from the first block on, threads
    started and pool work submitted from inside a private block marked as its own (`_start`, `_submit`)."""
    _filter_streams()
    with _silence_lock:
        if "thread_start" not in _silence:  # once: a tool wrapping start after us keeps its wrapper, no loop
            _silence["thread_start"] = threading.Thread.start
            threading.Thread.start = _start
            from concurrent.futures import ThreadPoolExecutor
            _silence["submit"] = ThreadPoolExecutor.submit
            ThreadPoolExecutor.submit = _submit
            _guard_said_once_state()


def _guard_said_once_state() -> None:
    """What is said only once is remembered process-wide, whether or not it was printed: transformers'
    `logger.warning_once` / `info_once` (an lru_cache of the messages) and each tokenizer's `deprecation_warnings`
    (its "sequence length is longer than the specified maximum" and "Asking to pad" flags). Set inside a private
    block, they would silence a later public warning, whose absence then says a training row triggered it. Inside any
    block, `*_once` calls do nothing (nothing cached) and a tokenizer's flags are a throwaway copy (`_OnceFlags`)."""
    try:
        import transformers.utils.logging  # noqa: F401  (it puts warning_once / info_once on logging.Logger)
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    for name in ("warning_once", "info_once"):
        said_once = getattr(logging.Logger, name, None)
        if said_once is not None and not getattr(said_once, "_slimtune_guarded", False):
            setattr(logging.Logger, name, _outside_blocks_only(said_once))
    if not isinstance(PreTrainedTokenizerBase.__dict__.get("deprecation_warnings"), _OnceFlags):
        PreTrainedTokenizerBase.deprecation_warnings = _OnceFlags()


def _outside_blocks_only(said_once):
    @functools.wraps(said_once)
    def guarded(self, *args, **kwargs):
        if _silence["depth"]:
            return None
        return said_once(self, *args, **kwargs)
    guarded._slimtune_guarded = True
    return guarded


class _OnceFlags:
    """A tokenizer's `deprecation_warnings` (said-once flags): its own dict outside private blocks, a copy inside
    (what a private block sets is forgotten when it reads them next). A data descriptor, so it also serves tokenizers
    built before it was installed (their dict stays in the instance's __dict__ under the same name)."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        flags = obj.__dict__.setdefault("deprecation_warnings", {})
        return dict(flags) if _silence["depth"] else flags

    def __set__(self, obj, value) -> None:
        obj.__dict__["deprecation_warnings"] = value


def _filter_streams() -> None:
    with _silence_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _PrivateAware):
                setattr(sys, name, _PrivateAware(stream))


def _start(self, *args, **kwargs):
    """threading.Thread.start, marking a thread started from inside a private block (or by such a thread: a thread
    pool a collator or a forward pass starts) as private: its writes are dropped while any block is active."""
    if getattr(_inside, "depth", 0) or getattr(threading.current_thread(), "_slimtune_private", False):
        self._slimtune_private = True
    return _silence["thread_start"](self, *args, **kwargs)


def _submit(self, fn, /, *args, **kwargs):
    """ThreadPoolExecutor.submit: work submitted from inside a private block (or from a private thread) runs as
    inside one on whichever worker takes it, a worker started before the block included (asyncio's default executor
    too)."""
    if getattr(_inside, "depth", 0) or getattr(threading.current_thread(), "_slimtune_private", False):
        fn = functools.partial(_run_inside, fn)
    return _silence["submit"](self, fn, *args, **kwargs)


def _run_inside(fn, *args, **kwargs):
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        return fn(*args, **kwargs)
    finally:
        _inside.depth -= 1


def _dropped() -> bool:
    """Whether this thread's write goes nowhere: it is inside a private block (or runs work submitted from one), or a
    block is active anywhere and the thread was started from one, or is not Python's and never wrote while no block
    was active (a C++ thread running Python code: autograd's device threads run backward hooks, and cannot be told
    from a grpc thread that calls back the user's code, whose output is then dropped during private steps until it
    has written once outside them). Python threads that were running before (a progress display's, a server's)
    pass."""
    if getattr(_inside, "depth", 0):
        return True
    if not _silence["depth"]:
        return False
    thread = threading.current_thread()
    if isinstance(thread, threading._DummyThread):  # not started by Python: private unless seen writing before
        return thread.ident not in _public_dummies
    return getattr(thread, "_slimtune_private", False)


class _PrivateAware:
    """A text stream that passes writes to `wrapped` except where `_dropped`; every other attribute is the wrapped
    stream's (fileno, buffer, encoding, isatty)."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # as a text stream, also while dropping (click probes with b"" once)
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not _silence["depth"] and isinstance(threading.current_thread(), threading._DummyThread):
            _public_dummies.add(threading.get_ident())  # a non-Python thread that wrote while no block was active
        if _dropped():
            return len(text)
        return self.wrapped.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not _dropped():
            self.wrapped.flush()

    def __getattr__(self, name):
        if name == "wrapped" or name.startswith("__"):  # an instance made without __init__ (copy, pickle)
            raise AttributeError(name)
        return getattr(self.wrapped, name)


_filter_streams()  # from import on: writes pass untouched until a private block is active
