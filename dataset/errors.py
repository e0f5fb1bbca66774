"""User-facing errors: one line that names the file or value, exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class InputError(ValueError):
    """Bad user input (file, list, value). The message is one line and names the culprit."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main``; turn :class:`InputError` into ``error: ...`` and exit status 2."""
    try:
        code = main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
