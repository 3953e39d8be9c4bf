"""Near misses for user errors: "did you mean ...?" after a misspelt key, stage, preset or module name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The choices closest to `word` (difflib), best first; [] when none is close."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`"; did you mean 'a'?"` for the choice closest to `word`; "" when none is close."""
    close = closest(word, choices, 1, cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""
