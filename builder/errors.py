"""The one error type a user sees."""

from __future__ import annotations


class BuildError(Exception):
    """A problem the user can fix: bad input, a bad image, a full disk.

    The CLI prints it as one line and exits non-zero, without a traceback.
    `where` is `file:line` for configuration errors.
    """

    def __init__(self, message: str, where: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ProfileError(BuildError):
    """Every problem found in a profile, reported together (exit code 2)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems), exit_code=2)
        self.problems = problems
