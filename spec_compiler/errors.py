"""The one user-facing error type, and the one wrapper that turns errors into exit codes.

Every message says what was found, what was expected, and the file or flag to fix.
Console entry points are wrapped in `cli_entry`: a SpecCompileError prints one line
`error: ...` and exits with code 2, Ctrl-C one line and 130; any other exception is a bug, not
bad input: one line `error: internal error: ...` and exit code 1, with the traceback only under
`--verbose` (which every entry point accepts: `add_verbose_flag`). Library warnings are shown
only under `--verbose` too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from typing import Callable, Iterator


class SpecCompileError(ValueError):
    """Bad input: a checkpoint, a draft, a tree, an engine or a request that cannot be used."""


_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")


def one_line(text: str) -> str:
    """`text` on one line that says exactly what it holds: newlines, terminal escapes and other
    non-printing characters (in a path, say) are written as escapes (`\\n`, `\\x1b`)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def brief(e: BaseException | str, limit: int = 200) -> str:
    """A library's exception (or message) as a short clause for an error line: `Type: text`
    with terminal escape codes dropped, whitespace collapsed, and cut at a word boundary."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}".rstrip(": ")
    text = one_line(" ".join(_ANSI.sub("", text).split()))
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut if cut > limit // 2 else limit].rstrip(" ,;:.(") + " ..."


def add_verbose_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--verbose", action="store_true",
                        help="show library warnings and progress logs, and the traceback of an "
                             "unexpected error")
    return parser


@contextlib.contextmanager
def _output(verbose: bool):
    """For one command: with --verbose, log lines (INFO) and warnings on stderr; without,
    neither Python warnings nor torch's own warning lines ("W1129 ... file.py:120] ..." from its
    Python loggers, and from C++, which reads TORCH_CPP_LOG_LEVEL when torch is first imported).
    Everything is restored afterwards (commands also run in-process, in tests)."""
    root, torch_log = logging.getLogger(), logging.getLogger("torch")
    saved = root.level, torch_log.level
    handler = None
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    else:
        warnings.simplefilter("ignore")
        torch_log.setLevel(logging.ERROR)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        torch_log.setLevel(saved[1])


_SIGNALS_SEEN = [0]  # interrupting signals handled so far (raise_interrupt)


def raise_interrupt(signum, frame) -> None:
    """Signal handler: count the signal, then raise KeyboardInterrupt. Python raises it wherever
    the main thread is, and library code that catches broad exceptions can turn it into another
    error (torch.export's fake-tensor dispatch, interrupted mid-trace, logs the KeyboardInterrupt
    and raises an unrelated error from it); `cli_entry` reads the count, so the user's Ctrl-C (or
    SIGTERM/SIGHUP during a compile) reads as `interrupted` whatever it became."""
    _SIGNALS_SEEN[0] += 1
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _counting_sigint() -> Iterator[int]:
    """Yields the signal count at entry; SIGINT goes through `raise_interrupt` meanwhile (only over
    Python's default handler, and only in the main thread, where handlers live)."""
    start = _SIGNALS_SEEN[0]
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield start
        return
    signal.signal(signal.SIGINT, raise_interrupt)
    try:
        yield start
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cli_entry(interrupted: str = "interrupted") -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for `main(argv=None) -> int`: SpecCompileError -> `error: MESSAGE` on stderr (one
    line) and 2; KeyboardInterrupt, or any error raised after an interrupting signal (see
    `raise_interrupt`) -> `interrupted` on stderr and 130; any other exception ->
    `error: internal error: ...` (one line; the traceback too with `--verbose`) and 1; other exit
    codes pass. Without `--verbose` (in argv), Python warnings are not shown."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            argv = args[0] if args else kwargs.get("argv")
            argv = sys.argv[1:] if argv is None else argv
            verbose = isinstance(argv, (list, tuple)) and "--verbose" in map(str, argv)
            with warnings.catch_warnings(), _output(verbose), _counting_sigint() as start:
                try:
                    return main(*args, **kwargs)
                except SpecCompileError as e:
                    if verbose:
                        traceback.print_exc()
                    print("error: " + one_line(str(e)), file=sys.stderr)
                    return 2
                except KeyboardInterrupt:
                    print(interrupted, file=sys.stderr)
                    return 130
                except Exception as e:  # a bug: one line, the traceback on request
                    if _SIGNALS_SEEN[0] > start:  # an interrupt turned into another error
                        print(interrupted, file=sys.stderr)
                        return 130
                    if verbose:
                        traceback.print_exc()
                    hint = "" if verbose else "; rerun with --verbose for the traceback"
                    print(f"error: internal error: {brief(e, 300)}{hint}", file=sys.stderr)
                    return 1
        return run
    return wrap
