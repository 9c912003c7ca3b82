"""User-facing errors."""


class DmaError(Exception):
    """A user-facing error: one line naming the file, field or value and what is wrong."""
