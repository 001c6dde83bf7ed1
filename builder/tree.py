"""The node's file system as a plan changes it: the model operations play against.

`Tree` is the base image (read-only, through `Base`) with the plan's changes over it;
`Changes` is what is left to do to a copy of the base: moves, deletes, the root file
system's files, folders and links, and the boot partition's few files (FAT has no
owners). Nothing here knows of plans, of libguestfs or of how changes are written.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Protocol

from builder.errors import BuildError, InputError, Place

ROOT = (0, 0)


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
    parents: set[str] = field(default_factory=set)  # folders neither the plan nor the base has, that it writes into
    before: dict[str, str] = field(default_factory=dict)  # what kind each changed path is in the base ("absent" too)

    @property
    def touches_boot(self) -> bool:
        return bool(self.boot_writes or self.boot_mkdirs or self.boot_deletes)


ABSENT = Stat("absent")


class Tree:
    """The node's file system as the plan changes it, over the base."""

    def __init__(self, base: Base, boot_dir: str) -> None:
        self.base = base
        self.boot_dir = boot_dir
        self.state: dict[str, Stat] = {}
        self.contents: dict[str, bytes] = {}
        self.moved: list[tuple[str, str]] = []  # (from, to): the base's paths under `to` are read from `from`
        self.claimed: dict[str, Place] = {}  # resolved path -> where the profile lists the `files:` entry that writes it

    def base_path(self, path: str) -> str:
        for old, new in reversed(self.moved):
            if under(path, new):
                return old + path[len(new):]
        return path

    def lstat(self, path: str) -> Stat:
        if path in self.state:
            return self.state[path]
        return self.in_base(path)

    def in_base(self, path: str) -> Stat:
        """What `path` is in the base, once the moves are made (ABSENT if it is not there)."""
        for old, _ in self.moved:
            if under(path, old):
                return ABSENT
        return self.base.lstat(self.base_path(path)) or ABSENT

    def read(self, path: str) -> bytes:
        if path in self.contents:
            return self.contents[path]
        return self.base.read(self.base_path(path))

    def resolve(self, path: str) -> str:
        """The path with every symlink in it followed inside the image, as the node will see
        it (an absolute link leads from the image's root, not the build machine's), so that
        what is written lands where the node looks."""
        todo = path.strip("/").split("/")
        done = ""
        links = 0
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                done = done.rsplit("/", 1)[0]
                continue
            here = f"{done}/{name}"
            st = self.lstat(here)
            if st.kind == "link":
                links += 1
                if links > 40:  # as the kernel's ELOOP
                    raise BuildError(f"cannot follow {path} in the image: too many symbolic links")
                if st.target.startswith("/"):
                    done = ""
                todo[:0] = st.target.split("/")
                continue
            if todo and st.kind not in ("dir", "absent"):
                raise BuildError(f"cannot write {path}: {here} is not a folder in the image")
            done = here
        return done or "/"

    def resolve_parent(self, path: str) -> str:
        """The path with the symlinks in its folders followed, its last name kept as it is."""
        folder, name = posixpath.split(path)
        return posixpath.join(self.resolve(folder), name)

    def put(self, path: str, st: Stat, content: bytes | None = None) -> None:
        """Record a change at a resolved path; a path a `files:` entry claims is refused."""
        if path in self.claimed:
            raise InputError(f"pibake writes {path} itself: choose another path", self.claimed[path])
        self.state[path] = st
        if content is None:
            self.contents.pop(path, None)
        else:
            self.contents[path] = content

    def on_boot(self, path: str) -> bool:
        return under(path, self.boot_dir)

    def write(self, path: str, content: bytes, mode: int, owner: tuple[int, int]) -> None:
        self.put(path, Stat("file", mode, owner), content)

    def text(self, path: str) -> str:
        return self.read(path).decode("utf-8", "surrogateescape")


def under(path: str, folder: str) -> bool:
    """`path` is `folder` or below it."""
    return path == folder or path.startswith(folder + "/")
