"""The one exception type users see, and the helpers that keep its messages to one line.

Every check of user input (a path, an option, an image, a config key) raises :class:`D2maeError` with a one-line
message that names the file or option and says what to do. The core speaks domain words: a problem with one option
carries that option's name (``D2maeError("must be ≥ 1, got 0", option="epochs")`` reads ``epochs: must be ≥ 1, got
0``), and the command line turns it into the flag (``option --epochs: must be ≥ 1, got 0``), printed as
``d2mae COMMAND: error: ...`` with exit status 2, before any training starts. Library users can catch it like any
``ValueError``.
"""

from __future__ import annotations


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
