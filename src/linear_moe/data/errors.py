"""The one error type the data pipeline raises for bad paths, files and arguments."""
from __future__ import annotations


class DataError(ValueError):
    """A missing, corrupt or mismatched data file (or a bad data argument).

    The message is one line naming the path (or value) and what is wrong with it.
    """
