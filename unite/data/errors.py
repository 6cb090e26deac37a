"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data-pipeline input; the message names the path or field, the value and the rule."""
