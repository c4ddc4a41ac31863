"""The one exception type users see, and the helpers that keep its messages to one line.

Every check of user input (a path, an option, an image, a config key) raises :class:`D2maeError` with a one-line
message that names the file or option and says what to do. The core speaks domain words: a problem with one option
carries that option's name (``D2maeError("must be ≥ 1, got 0", option="epochs")`` reads ``epochs: must be ≥ 1, got
0``), and the command line turns it into the flag (``option --epochs: must be ≥ 1, got 0``), printed as
``d2mae COMMAND: error: ...`` with exit status 2, before any training starts. Library users can catch it like any
``ValueError``.
"""

from __future__ import annotations

import errno
import reprlib
from typing import Any

_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


class D2maeError(ValueError):
    """A problem with the user's input, explained in one line.

    Args:
        message: what is wrong and what to do, in the library's words.
        option: the config field the problem is about (``batch_size``), if it is about one; the command line shows
            it as its flag (``--batch-size``).
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.option = option

    def __str__(self) -> str:
        return f"{self.option}: {self.message}" if self.option else self.message


def reason(exc: BaseException) -> str:
    """One short line describing an exception."""
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, capped at ``limit`` characters, and cheap for any size of value (a YAML
    alias bomb's billion elements are never visited: reprlib stops at a few items per level)."""
    text = _SHOWN.repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full; free space or choose another output folder",
    errno.EDQUOT: "the disk quota is used up; free space or choose another output folder",
    errno.EROFS: "the file system is read-only; choose a writable output folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOENT: "it does not exist; check the path",
}


def os_error_message(exc: OSError) -> str:
    """One line for a failed file operation: the file, the system's reason and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    cause = exc.strerror or type(exc).__name__
    advice = _OS_ADVICE.get(exc.errno or -1)
    return f"cannot use {where}: {cause}" + (f" — {advice}" if advice else "")
