"""Progress bars: tqdm on a terminal, silent when piped or with --quiet."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

quiet = False


def bar(*args: Any, disable: bool | None = None, **kwargs: Any) -> tqdm:
    return tqdm(*args, disable=True if quiet else disable, **kwargs)
