"""Deprecated spellings: one warning, one wording, for every renamed argument, field and flag."""

from __future__ import annotations

import warnings

__all__ = ["VOCABULARY", "renamed"]

#: What hf_collapse calls things now, for the warnings.
VOCABULARY = (
    "hf_collapse speaks of num_units, max_metric_delta and max_metric_ratio for every collapse budget, of "
    "budget_elements, budget_bytes and budget_ratio for TraDy's, and of max_length for tokens"
)


def renamed(old: str, new: str, where: str, stacklevel: int = 3) -> None:
    """Warn (``FutureWarning``, shown to users by default) that ``old``, an argument, field or flag of ``where``, is
    deprecated in favour of ``new`` and goes away in the next release.

    Example::

        >>> import warnings
        >>> from hf_collapse.deprecation import renamed
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed("num_blocks", "num_units", "hf_collapse.collapse")
        >>> str(caught[0].message).split(";")[0]
        "hf_collapse.collapse: 'num_blocks' is deprecated and will be removed in the next release"
    """
    warnings.warn(
        f"{where}: {old!r} is deprecated and will be removed in the next release; use {new!r} ({VOCABULARY})",
        FutureWarning,
        stacklevel=stacklevel,
    )
