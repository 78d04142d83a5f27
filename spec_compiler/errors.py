"""The one user-facing error type, and the one wrapper that turns it into an exit code.

Every message says what was found, what was expected, and the file or flag to fix.
Console entry points are wrapped in `cli_entry`: a SpecCompileError prints one line
`error: ...` and exits with code 2, Ctrl-C one line and 130; anything else keeps its
traceback (a bug, not bad input).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class SpecCompileError(ValueError):
    """Bad input: a checkpoint, a draft, a tree, an engine or a request that cannot be used."""


def cli_entry(interrupted: str = "interrupted") -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for `main(argv=None) -> int`: SpecCompileError -> `error: MESSAGE` on stderr (one
    line) and 2; KeyboardInterrupt -> `interrupted` on stderr and 130; other exit codes pass."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except SpecCompileError as e:
                print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                return 130
        return run
    return wrap
