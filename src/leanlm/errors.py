"""User-facing errors: each says what is wrong and how to fix it (the CLI prints them as one line)."""


class LeanlmError(Exception):
    """An error caused by the user's input or environment, not by a bug in leanlm."""
