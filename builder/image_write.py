"""A node's `Changes` written into its copy of the base, on the host, the same every time.

The root file system is changed by e2fsprogs' debugfs, the boot partition by mtools:
both are single-threaded writers in user space that allocate in a fixed order, give
new inodes no random generation, write nothing to the journal, and take every time
they write from the one they are given (libext2fs' E2FSPROGS_FAKE_TIME, mtools'
SOURCE_DATE_EPOCH). The same Changes on the same base give the same bytes. A kernel
would not: it picks blocks by CPU and writeback timing, draws a random generation
for each new inode, and logs its transactions, with their times, in the journal.

debugfs reads one command a line and splits it as the ss library does: a word
holding a space or a quote is written in double quotes, a quote in it doubled. A
line break cannot be quoted, and no path or link target written here holds one.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from builder import run
from builder.errors import BuildError
from builder.tree import ROOT, Changes, Stat

log = logging.getLogger(__name__)

# Where the e2fsprogs and mtools programs are, whatever the caller's PATH (a user's
# PATH on Debian has no /usr/sbin). They run with TOOL_ENV alone (and the time they
# write): no locale, configuration or time of the caller's reaches an image.
TOOL_PATH = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
TOOL_ENV = {"PATH": TOOL_PATH, "LC_ALL": "C", "TZ": "UTC"}
TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "link": stat.S_IFLNK}


def tool(name: str, package: str) -> str:
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        raise BuildError(f"{name} is not installed: install the {package} package (see README)")
    return found


def quoted(word: str) -> str:
    """`word` as one argument of a debugfs command."""
    if "\n" in word or "\r" in word or "\0" in word:
        raise BuildError(f"cannot write {word!r}: it holds a line break")
    return '"' + word.replace('"', '""') + '"'


class RootScript:
    """The debugfs commands for the root file system's part of `changes`."""

    def __init__(self, changes: Changes, epoch: int, files: Path) -> None:
        self.lines: list[str] = []
        self.touched: set[str] = set()  # folders that were there before whose entries change
        self.made: set[str] = set()  # folders made here (their times are the epoch already)
        gone: set[str] = set()
        for old, new in changes.moves:
            if posixpath.dirname(old) != posixpath.dirname(new):
                raise BuildError(f"cannot move {old} to {new}: a folder is only renamed within its own folder")
            self._do("ln", old, new)
            self._do("unlink", old)
            self.touched.add(posixpath.dirname(new))
        for path in changes.deletes:
            self._do("rm", path)
            gone.add(path)
            self.touched.add(posixpath.dirname(path))
        # The folders the plan writes into that are not there are made as tar or mkdir -p
        # would make them: root's, 0755.
        entries = {**{folder: Stat("dir", 0o755, ROOT) for folder in changes.parents}, **changes.root}
        for number, path in enumerate(sorted(entries, key=lambda p: p.split("/"))):
            st = entries[path]
            before = "absent" if path in gone else changes.before.get(path, "absent")
            if before == "dir" and st.kind != "dir":
                raise BuildError(f"cannot write {path}: it is a folder in the image")
            fresh = before != "dir"  # a folder that is there keeps its inode; anything else is made anew
            if fresh and before != "absent":
                self._do("rm", path)
            if st.kind == "dir":
                if fresh:
                    self._do("mkdir", path)
                    self.made.add(path)
                else:
                    self.touched.add(path)
            elif st.kind == "link":
                self._do("symlink", path, st.target)
            else:
                data = files / str(number)
                data.write_bytes(changes.contents[path])
                self._do("write", str(data), path)
            if fresh:
                self.touched.add(posixpath.dirname(path))
            if st.kind != "link":
                self._do("sif", path, "mode", f"0{TYPE_BITS[st.kind] | st.mode:o}")
            self._do("sif", path, "uid", str(st.owner[0]))
            self._do("sif", path, "gid", str(st.owner[1]))
        # A folder whose entries or metadata changed: its change and modification times
        # are the epoch, as a kernel would have made them the time of the change.
        for folder in sorted(self.touched - self.made):
            for field in ("mtime", "ctime"):
                self._do("sif", folder, f"{field}_extra", "0")
                self._do("sif", folder, field, f"@{epoch}")

    def _do(self, command: str, *words: str) -> None:
        self.lines.append(" ".join([command, *(quoted(w) for w in words)]))

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def _explain(message: str) -> str:
    if "Could not allocate" in message or "No free space" in message:
        return "the image's root file system is full"
    return message


def _output_full(image: Path, node: str) -> BuildError:
    free = shutil.disk_usage(image.parent).free
    return BuildError(f"{node}: no space left on the output disk ({image.parent}, {free >> 20} MiB free)")


def _disk_full(message: str) -> bool:
    return "no space left on device" in message.lower() or "short write" in message.lower()


@contextmanager
def _scratch(image: Path, node: str) -> Iterator[Path]:
    """A private folder beside the image for what the writers read (the files' contents),
    on the output disk: one that fills up is said to be full."""
    try:
        with tempfile.TemporaryDirectory(prefix="pibake-write-", dir=image.parent) as folder:
            yield Path(folder)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _output_full(image, node) from None
        raise


def write_root(image: Path, offset: int, changes: Changes, epoch: int, node: str) -> None:
    """The root file system's part of `changes`, written by debugfs into the file system at `offset`."""
    if not (changes.root or changes.moves or changes.deletes):
        return
    debugfs = tool("debugfs", "e2fsprogs")
    with _scratch(image, node) as folder:
        script = RootScript(changes, epoch, folder)
        commands = folder / "commands"
        commands.write_text(script.text())
        command = [debugfs, "-w", "-f", str(commands), f"{image}?offset={offset}"]
        log.debug("$ %s  (%d commands)", " ".join(command), len(script.lines))
        # stdbuf: debugfs's echo of each command and its errors arrive in order, so an
        # error is told with the command it answered.
        done = subprocess.run([tool("stdbuf", "coreutils"), "-oL", "-eL", *command], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**TOOL_ENV, "E2FSPROGS_FAKE_TIME": str(epoch)})
    failed = _first_error(run.text(done.stdout))
    if done.returncode != 0 or failed:
        command_line, message = failed or ("", run.tail(run.text(done.stdout)) or f"exit status {done.returncode}")
        if _disk_full(message):
            raise _output_full(image, node)
        what = f" ({command_line})" if command_line else ""
        raise BuildError(f"{node}: cannot write the root file system{what}: {_explain(message)}")


def _first_error(output: str) -> tuple[str, str] | None:
    """The first command debugfs answered with an error, and the error."""
    command = ""
    for line in output.splitlines():
        if line.startswith("debugfs: "):
            command = line[len("debugfs: "):]
        elif line.startswith("debugfs ") or line.startswith("Allocated inode:") or not line.strip():
            continue  # its banner, and what it says of a write that worked
        else:
            return command, line.strip()
    return None


def write_boot(image: Path, offset: int, boot_dir: str, changes: Changes, epoch: int, node: str) -> None:
    """The boot partition's part of `changes`, written by mtools into the FAT file system at `offset`."""
    if not changes.touches_boot:
        return
    drive = f"{image}@@{offset}"
    # FAT holds local times: mtools' are UTC here, and the epoch is its "now".
    env = {**TOOL_ENV, "SOURCE_DATE_EPOCH": str(epoch), "MTOOLSRC": os.devnull,
           "MTOOLS_SKIP_CHECK": "1"}

    def fat(path: str) -> str:
        return "::" + path[len(boot_dir):]

    def mtools(name: str, *args: str, what: str) -> None:
        try:
            run.run([tool(name, "mtools"), "-i", drive, *args], what=f"{node}: cannot {what}", env=env)
        except run.CommandError as e:
            if _disk_full(e.stderr):
                raise _output_full(image, node) from None
            raise BuildError(str(e).replace("\n", " ")) from None

    for path in changes.boot_mkdirs:
        if changes.before.get(path) != "dir":
            mtools("mmd", fat(path), what=f"make {path}")
    for path in changes.boot_deletes:
        mtools("mdel", fat(path), what=f"delete {path}")
    with _scratch(image, node) as folder:
        for number, (path, content) in enumerate(sorted(changes.boot_writes.items())):
            data = folder / str(number)
            data.write_bytes(content)
            mtools("mcopy", "-o", str(data), fat(path), what=f"write {path}")


def write(image: Path, offsets: tuple[int, int], boot_dir: str, changes: Changes, epoch: int, node: str) -> None:
    """Every change of one node, into its copy `image` (boot partition at offsets[0], root at offsets[1])."""
    write_root(image, offsets[1], changes, epoch, node)
    write_boot(image, offsets[0], boot_dir, changes, epoch, node)
