"""From a node's plan to the few changes the appliance makes to its copy.

Every node image starts as an exact copy of the base, so whatever a plan reads
(the lines it edits, whether a path exists, where a symlink leads) is read once
from the base and the plan is played through on the host. What is left per node
is a handful of appliance calls: moves, deletes, one tar archive unpacked over
the root file system, and the boot partition's few files (FAT has no owners,
which tar would try to set).
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Protocol

from builder.errors import BuildError
from builder.plan import MASK, ROOT, Append, Delete, EditLines, Mkdir, Move, NodePlan, Symlink, Write


@dataclass(frozen=True)
class Stat:
    kind: str  # file, dir, link, other
    mode: int = 0o644
    owner: tuple[int, int] = ROOT
    target: str = ""  # a link's


class Base(Protocol):
    """The base image, read-only: lstat (None when absent) and file contents."""

    def lstat(self, path: str) -> Stat | None: ...

    def read(self, path: str) -> bytes: ...


@dataclass
class Changes:
    moves: list[tuple[str, str]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    root: dict[str, Stat] = field(default_factory=dict)  # what the archive holds; files' data in contents
    contents: dict[str, bytes] = field(default_factory=dict)
    boot_writes: dict[str, bytes] = field(default_factory=dict)
    boot_mkdirs: list[str] = field(default_factory=list)
    boot_deletes: list[str] = field(default_factory=list)

    @property
    def touches_boot(self) -> bool:
        return bool(self.boot_writes or self.boot_mkdirs or self.boot_deletes)

    def add_to(self, archive: tarfile.TarFile, prefix: str, mtime: float) -> None:
        """The root file system's part, under `prefix`: numeric owners, parents before children."""
        for path in sorted(self.root, key=lambda p: p.split("/")):
            st = self.root[path]
            info = tarfile.TarInfo(prefix + path)
            info.mode, (info.uid, info.gid), info.mtime = st.mode, st.owner, mtime
            info.uname = info.gname = ""  # so tar in the appliance keeps the numbers
            data = None
            if st.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif st.kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, st.target
            else:
                data = self.contents[path]
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)


_ABSENT = Stat("absent")


class _Tree:
    """The node's file system as the plan changes it, over the base."""

    def __init__(self, base: Base, boot_dir: str) -> None:
        self.base = base
        self.boot_dir = boot_dir
        self.state: dict[str, Stat] = {}
        self.contents: dict[str, bytes] = {}
        self.moved: list[tuple[str, str]] = []  # (from, to): the base's paths under `to` are read from `from`

    def _base_path(self, path: str) -> str:
        for old, new in reversed(self.moved):
            if _under(path, new):
                return old + path[len(new):]
        return path

    def lstat(self, path: str) -> Stat:
        if path in self.state:
            return self.state[path]
        for old, _ in self.moved:
            if _under(path, old):
                return _ABSENT
        return self.base.lstat(self._base_path(path)) or _ABSENT

    def read(self, path: str) -> bytes:
        if path in self.contents:
            return self.contents[path]
        return self.base.read(self._base_path(path))

    def resolve(self, path: str) -> str:
        """Follow symlinks inside the image, as writing through the path would."""
        for _ in range(8):
            st = self.lstat(path)
            if st.kind != "link":
                return path
            path = posixpath.normpath(posixpath.join(posixpath.dirname(path), st.target))
        return path

    def on_boot(self, path: str) -> bool:
        return _under(path, self.boot_dir)

    def write(self, path: str, content: bytes, mode: int, owner: tuple[int, int]) -> None:
        self.state[path] = Stat("file", mode, owner)
        self.contents[path] = content

    def text(self, path: str) -> str:
        return self.read(path).decode("utf-8", "surrogateescape")


def realize(plan: NodePlan, base: Base) -> Changes:
    tree = _Tree(base, plan.release.boot_dir)
    node = plan.node.hostname
    changes = Changes()
    for op in plan.ops:
        try:
            _play(tree, op, changes)
        except BuildError as e:
            raise BuildError(f"{node}: {e}") from None
    for path, st in tree.state.items():
        if tree.on_boot(path):
            if st.kind == "file":
                changes.boot_writes[path] = tree.contents[path]
            elif st.kind == "dir":
                changes.boot_mkdirs.append(path)
            elif st.kind == "link":
                raise BuildError(f"{node}: cannot make the symlink {path}: the boot partition is FAT")
        elif st.kind != "absent":
            changes.root[path] = st
            if st.kind == "file":
                changes.contents[path] = tree.contents[path]
    changes.boot_mkdirs.sort()
    return changes


def _play(tree: _Tree, op, changes: Changes) -> None:
    if isinstance(op, Write):
        path = tree.resolve(op.path)
        tree.write(path, op.content, op.mode, op.owner)
    elif isinstance(op, Mkdir):
        tree.state[op.path] = Stat("dir", op.mode, op.owner)
    elif isinstance(op, Symlink):
        _check_target(tree, op)
        tree.state[op.path] = Stat("link", 0o777, ROOT, op.target)
    elif isinstance(op, Delete):
        if tree.lstat(op.path).kind == "dir":
            raise BuildError(f"cannot delete {op.path}: it is a directory in the image")
        if op.path in tree.state or tree.lstat(op.path).kind != "absent":
            in_base = tree.base.lstat(tree._base_path(op.path)) is not None
            tree.state[op.path] = _ABSENT
            tree.contents.pop(op.path, None)
            if in_base:
                (changes.boot_deletes if tree.on_boot(op.path) else changes.deletes).append(op.path)
    elif isinstance(op, Move):
        _move(tree, op, changes)
    elif isinstance(op, EditLines):
        _edit(tree, op)
    elif isinstance(op, Append):
        path = tree.resolve(op.path)
        st = tree.lstat(path)
        old = tree.text(path) if st.kind == "file" else ""
        if op.text not in old:
            separator = "" if not old or old.endswith("\n") else "\n"
            new = (old + separator + op.text).encode("utf-8", "surrogateescape")
            mode, owner = (st.mode, st.owner) if st.kind == "file" else (0o644, ROOT)
            tree.write(path, new, mode, owner)


def _move(tree: _Tree, op: Move, changes: Changes) -> None:
    if tree.lstat(op.path).kind == "absent":
        raise BuildError(f"cannot move {op.path}: it does not exist in the image")
    # Moves run before the archive is unpacked; what the plan made so far under
    # either path would be lost or misplaced by that reordering.
    touched = [p for p in tree.state if _under(p, op.path) or _under(p, op.destination)]
    if touched or tree.base.lstat(tree._base_path(op.path)) is None:
        raise BuildError(f"cannot move {op.path}: the plan changes it before moving it")
    changes.moves.append((tree._base_path(op.path), op.destination))
    tree.moved.append((op.path, op.destination))


def _check_target(tree: _Tree, op: Symlink) -> None:
    """Refuse a link that would dangle in the image, as virt-customize --link does."""
    if op.target == MASK:
        return
    target = posixpath.normpath(posixpath.join(posixpath.dirname(op.path), op.target))
    if tree.lstat(tree.resolve(target)).kind == "absent":
        raise BuildError(f"cannot link {op.path} to {op.target}: it does not exist in the image")


def link_targets(plans: list[NodePlan]) -> set[str]:
    """The absolute paths that the plans' symlinks lead to."""
    return {posixpath.normpath(posixpath.join(posixpath.dirname(op.path), op.target))
            for plan in plans for op in plan.ops if isinstance(op, Symlink) and op.target != MASK}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _edit(tree: _Tree, op: EditLines) -> None:
    path = tree.resolve(op.path)
    st = tree.lstat(path)
    if st.kind != "file":
        if op.required:
            raise BuildError(f"{op.path} is missing from the image")
        return
    old = tree.text(path)
    pattern = re.compile(op.pattern)
    matches = 0
    lines = []
    for line in old.split("\n"):
        new, n = pattern.subn(op.replacement, line)
        matches += n
        lines.append(new)
    if op.required and matches == 0:
        raise BuildError(f"{op.path} in the image has no line matching {op.pattern}")
    new_text = "\n".join(lines)
    if new_text != old:
        tree.write(path, new_text.encode("utf-8", "surrogateescape"), st.mode, st.owner)


def paths_read(plans: list[NodePlan]) -> set[str]:
    """Every path the plans look at in the base: what to ask the appliance for in one go."""
    return {op.path for plan in plans for op in plan.ops} | link_targets(plans)
