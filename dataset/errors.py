"""User-facing errors: one line that names the file or value, exit status 2."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence


class InputError(ValueError):
    """Bad user input (file, list, value) or a file system that refuses a write. The message is one
    line and names the culprit."""


#: File-system errors that mean "this output cannot be written here" (not a bug of the program).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                          errno.ENOTDIR, errno.EEXIST, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG})


def os_error_text(exc: OSError) -> str:
    """The cause of an OSError in words ("No space left on device"), without the path."""
    return exc.strerror or str(exc) or type(exc).__name__


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main``; turn :class:`InputError` and file-system errors into one line
    ``error: ...`` and exit status 2."""
    try:
        code = main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system refusal that no check caught: still one line naming the path
        where = exc.filename if exc.filename is not None else "file system"
        print(f"error: {where}: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
