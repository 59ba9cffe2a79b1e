"""User-facing errors.

A :class:`MimcoError` is a mistake in what the user asked for (a missing folder, an unknown
config key, a wrong checkpoint). The CLI prints its one-line message and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class MimcoError(Exception):
    """An error caused by user input; its message names the problem and the fix."""
