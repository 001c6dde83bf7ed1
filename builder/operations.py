"""The closed set of file operations a plan is made of; each describes, sizes and plays itself.

An operation is data: the plan lists them, `pibake plan` and the manifest show
them (`describe`, secrets redacted), the free-space check adds up what they
write (`size`), and realize plays them through against the base (`play`), which
is where the image's own files are read and every path is checked.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional, Union

from builder import promises
from builder.errors import BuildError, InputError, Place
from builder.settings import destination_problem
from builder.tree import ABSENT, ROOT, Changes, Stat, under

if TYPE_CHECKING:
    from builder.tree import Tree

# A unit linked to /dev/null is masked: systemd reads the link, and /dev is empty
# until the node boots.
MASK = "/dev/null"


def _block_rounded(size: int) -> int:
    return 4096 * (1 + size // 4096)


def _summary(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return "(empty)"
    first = lines[0] if len(lines[0]) <= 50 else lines[0][:47] + "..."
    return first if len(lines) == 1 else f"{first} (+{len(lines) - 1} lines)"


class _Op:
    name: ClassVar[str]
    path: str

    def describe(self) -> dict[str, str]:
        """The operation as the plan and the manifest show it: secrets stay out."""
        return {"op": self.name, "path": self.path}

    def size(self) -> int:
        """Room it takes on the root file system, generously: a block at least."""
        return _block_rounded(0)

    def reads(self) -> set[str]:
        """Paths it looks at in the base, to fetch in one go before playing."""
        return {self.path}

    def play(self, tree: Tree, changes: Changes) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Write(_Op):
    path: str
    content: bytes = field(repr=False)
    mode: int = 0o644
    owner: tuple[int, int] = ROOT
    secret: bool = False
    # for a profile's `files:` entry, where it is listed: "profiles/cluster.yaml:12: master.files[0]",
    # the file it is read from (resolved), and the promises it may break (builder.promises)
    origin: Optional[Place] = None
    source: str = ""
    allow: tuple[str, ...] = ()
    name: ClassVar[str] = "write"

    def describe(self) -> dict[str, str]:
        out = {**super().describe(), "mode": f"{self.mode:04o}", "owner": f"{self.owner[0]}:{self.owner[1]}"}
        # A secret shows its size and sha256 only: enough to tell which version went in.
        out["sha256"] = hashlib.sha256(self.content).hexdigest()
        if self.secret:
            out["summary"] = f"<secret, {len(self.content)} bytes, sha256 {out['sha256'][:16]}, redacted>"
        else:
            out["summary"] = _summary(self.content.decode(errors="replace"))
        if self.source:
            out["source"] = self.source
        if self.allow:
            # What an entry is allowed to break is shown whole, unless it is a secret.
            out["allows"] = ", ".join(self.allow)
            if not self.secret:
                out["content"] = self.content.decode(errors="replace")
        return out

    def size(self) -> int:
        return _block_rounded(len(self.content))

    def play(self, tree: Tree, changes: Changes) -> None:
        # A profile's file: every refusal is the profile's, and says where it lists the file.
        kind, where = (InputError, self.origin) if self.origin else (BuildError, Place())
        try:
            path = tree.resolve(self.path)
        except BuildError as e:
            raise kind(e.message, where) from None
        if tree.lstat(path).kind == "dir":
            raise kind(f"cannot write {self.path}: it is a folder in the image", where)
        if self.origin:
            problem = destination_problem(path) if path != self.path else None
            if problem:
                raise InputError(f"{self.path} leads to {problem}", where)
            if path in tree.claimed:
                raise InputError(f"{path} is written by {tree.claimed[path]} too", where)
            if path in tree.state:
                shown = self.path if path == self.path else f"{self.path} (which is {path} in the image)"
                raise InputError(f"pibake writes {shown} itself: choose another path", where)
            self._keeps_promises(tree, path)
        tree.write(path, self.content, self.mode, self.owner)
        if self.origin:
            tree.claimed[path] = self.origin

    def _keeps_promises(self, tree: Tree, path: str) -> None:
        """A profile's file, where it resolves in the image: what pibake promises stays true."""
        shown = self.path if path == self.path else f"{self.path} (which is {path} in the image)"
        broken = promises.by_path(path)
        if broken is not None and broken.name not in self.allow:
            raise InputError(promises.refusal(shown, broken), self.origin)
        if tree.on_boot(path) and (self.secret or self.owner != ROOT):
            raise InputError(f"{shown} is on the boot partition, whose FAT file system keeps no owners or modes: "
                             "anyone on the node could read it; put it on the root file system", self.origin)
        moved = next((m for m in tree.moved if under(path, m[0])), None)
        if moved is not None:
            raise InputError(f"{shown} is under {moved[0]}, which pibake renames to {moved[1]} "
                             f"(user.name): write {moved[1] + path[len(moved[0]):]}", self.origin)


@dataclass(frozen=True)
class Mkdir(_Op):
    path: str
    mode: int = 0o755
    owner: tuple[int, int] = ROOT
    name: ClassVar[str] = "mkdir"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "mode": f"{self.mode:04o}", "owner": f"{self.owner[0]}:{self.owner[1]}"}

    def play(self, tree: Tree, changes: Changes) -> None:
        tree.put(tree.resolve(self.path), Stat("dir", self.mode, self.owner))


@dataclass(frozen=True)
class Symlink(_Op):
    path: str
    target: str
    name: ClassVar[str] = "symlink"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "summary": f"-> {self.target}"}

    @property
    def leads_to(self) -> str:
        """The target as an absolute path in the image."""
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.path), self.target))

    def reads(self) -> set[str]:
        return {self.path} if self.target == MASK else {self.path, self.leads_to}

    def play(self, tree: Tree, changes: Changes) -> None:
        # A link that would dangle in the image is refused, as virt-customize --link does.
        if self.target != MASK and tree.lstat(tree.resolve(self.leads_to)).kind == "absent":
            raise BuildError(f"cannot link {self.path} to {self.target}: it does not exist in the image")
        tree.put(tree.resolve_parent(self.path), Stat("link", 0o777, ROOT, self.target))


@dataclass(frozen=True)
class Delete(_Op):
    path: str
    name: ClassVar[str] = "delete"

    def play(self, tree: Tree, changes: Changes) -> None:
        path = tree.resolve_parent(self.path)
        if tree.lstat(path).kind == "dir":
            raise BuildError(f"cannot delete {self.path}: it is a directory in the image")
        if path in tree.state or tree.lstat(path).kind != "absent":
            in_base = tree.base.lstat(tree.base_path(path)) is not None
            tree.put(path, ABSENT)
            if in_base:
                (changes.boot_deletes if tree.on_boot(path) else changes.deletes).append(path)


@dataclass(frozen=True)
class EditLines(_Op):
    """Apply a regular expression substitution to every line of a file."""

    path: str
    pattern: str
    replacement: str
    required: bool = True  # an image where no line matches is refused
    secret: bool = False
    name: ClassVar[str] = "edit"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "summary": f"s/{self.pattern}/{'<redacted>' if self.secret else self.replacement}/"}

    def play(self, tree: Tree, changes: Changes) -> None:
        path = tree.resolve(self.path)
        st = tree.lstat(path)
        if st.kind != "file":
            if self.required:
                raise BuildError(f"{self.path} is missing from the image")
            return
        old = tree.text(path)
        pattern = re.compile(self.pattern)
        matches = 0
        lines = []
        for line in old.split("\n"):
            new, n = pattern.subn(self.replacement, line)
            matches += n
            lines.append(new)
        if self.required and matches == 0:
            raise BuildError(f"{self.path} in the image has no line matching {self.pattern}")
        new_text = "\n".join(lines)
        if new_text != old:
            tree.write(path, new_text.encode("utf-8", "surrogateescape"), st.mode, st.owner)


@dataclass(frozen=True)
class Append(_Op):
    """Append text to a file unless the file already holds it."""

    path: str
    text: str
    name: ClassVar[str] = "append"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "summary": "+ " + _summary(self.text)}

    def size(self) -> int:
        return _block_rounded(len(self.text))

    def play(self, tree: Tree, changes: Changes) -> None:
        path = tree.resolve(self.path)
        st = tree.lstat(path)
        old = tree.text(path) if st.kind == "file" else ""
        if self.text not in old:
            separator = "" if not old or old.endswith("\n") else "\n"
            new = (old + separator + self.text).encode("utf-8", "surrogateescape")
            mode, owner = (st.mode, st.owner) if st.kind == "file" else (0o644, ROOT)
            tree.write(path, new, mode, owner)


@dataclass(frozen=True)
class Move(_Op):
    path: str
    destination: str
    name: ClassVar[str] = "move"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "summary": f"-> {self.destination}"}

    def play(self, tree: Tree, changes: Changes) -> None:
        if tree.lstat(self.path).kind == "absent":
            raise BuildError(f"cannot move {self.path}: it does not exist in the image")
        # Moves run before the archive is unpacked; what the plan made so far under
        # either path would be lost or misplaced by that reordering.
        touched = [p for p in tree.state if under(p, self.path) or under(p, self.destination)]
        if touched or tree.base.lstat(tree.base_path(self.path)) is None:
            raise BuildError(f"cannot move {self.path}: the plan changes it before moving it")
        changes.moves.append((tree.base_path(self.path), self.destination))
        tree.moved.append((self.path, self.destination))


Op = Union[Write, Mkdir, Symlink, Delete, EditLines, Append, Move]
