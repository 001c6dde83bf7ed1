"""Progress bars: tqdm on a terminal, silent when piped or with --quiet."""

from __future__ import annotations

import sys
from typing import Any

quiet = False


class _Hidden:
    """What a bar that would not be shown is: tqdm is not even imported for it (15 ms)."""

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Hidden":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(*args: Any, disable: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; `disable=None` shows it only on a terminal, as tqdm does."""
    if quiet or disable or (disable is None and not sys.stderr.isatty()):
        return _Hidden()
    from tqdm import tqdm

    from builder import formats, urls

    if "desc" in kwargs:  # a file or device name from elsewhere: no escape sequence reaches the terminal
        kwargs["desc"] = formats.shown(urls.shown(str(kwargs["desc"])), 80)
    return tqdm(*args, disable=False, **kwargs)
