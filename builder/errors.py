"""The errors a user sees, and where each problem is, as data.

A problem knows its place (a profile's file, line and key; a node; a device) apart
from its message; places are formatted and problems sorted once, at the command line,
which also alone chooses the exit status, from the kind of error: `InputError` for
what the user gave (a profile, an argument, a device chosen), `BuildError` for the
rest. Wrapping an error with more of its place (`within`) keeps its kind.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Place:
    """Where a problem is: any of a node, a file and its line, a key path, a device."""

    node: str = ""
    file: str = ""
    line: Optional[int] = None
    key: str = ""  # shown: "master.files[0]", or an environment variable's name
    device: str = ""
    setting: str = ""  # not shown (the message names it as the user would): the key path, "workers.nodes[2].mac"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line is not None else self.file
        return ": ".join(part for part in (self.node, where, self.key, self.device) if part)

    def sort_key(self) -> tuple:
        """Problems of one file in its order; those without a line (the environment) last."""
        return (self.line is None, self.file, self.line or 0)


class BuildError(Exception):
    """A problem the user can fix: a bad image, a full disk, a server that fails.

    The CLI prints it as one line, its place first, and exits 1; no traceback."""

    def __init__(self, message: str, where: Optional[Place] = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where or Place()

    def __str__(self) -> str:
        where = str(self.where)
        return f"{where}: {self.message}" if where else self.message

    def within(self, **place: str) -> "BuildError":
        """The same error, of the same kind, with more of its place filled in (a node, say)."""
        wrapped = copy.copy(self)
        known = {k: v for k, v in dataclasses.asdict(self.where).items() if v not in ("", None)}
        wrapped.where = Place(**{**place, **known})
        wrapped.args = (self.message,)
        return wrapped


class InputError(BuildError):
    """What the user gave is wrong: a profile value, an argument, a device, a folder. Exit 2."""


class Stopped(BuildError):
    """Stopped as the user asked, with nothing more done: a question answered no (exit 1),
    or Ctrl-C (`interrupted`, exit 130). An empty message: what it stopped has said so."""

    def __init__(self, message: str = "", interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


@dataclass(frozen=True)
class Problem:
    """One problem of a profile: its place and what is wrong."""

    where: Place
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if str(self.where) else self.message


class ProfileError(InputError):
    """Every problem found in a profile, reported together."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))

    def lines(self) -> list[str]:
        """The problems in the file's order, one line each: what the command line prints."""
        return [str(p) for p in sorted(self.problems, key=lambda p: p.where.sort_key())]
