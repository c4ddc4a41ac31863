"""The one exception type users see.

Every check of user input (a path, an option, an image, a config key) raises :class:`D2maeError` with a one-line
message that names the file or option and says what to do. The command line prints it as ``d2mae COMMAND: error: ...`` and
exits with status 2, before any training starts; library users can catch it like any ``ValueError``.
"""

from __future__ import annotations


class D2maeError(ValueError):
    """A problem with the user's input, explained in one line."""
