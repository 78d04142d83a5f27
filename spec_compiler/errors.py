"""The one user-facing error type.

Every message says what was found, what was expected, and the file or flag to fix.
`spec_compiler.cli.main` prints it on one line and exits with code 2; anything else keeps
its traceback (a bug, not bad input).
"""


class SpecCompileError(ValueError):
    """Bad input: a checkpoint, a draft, a tree, an engine or a request that cannot be used."""
