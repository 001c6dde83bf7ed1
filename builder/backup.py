"""`pibake backup NODE`: a running node's file systems, read as files, kept as an image of its own layout.

The node is reached as `pibake check` reaches it, through output/ssh_config. What it
sends: its card's layout, a listing of each file system (type, inode, links, size,
times, path), and a tar stream of the files that changed since the last backup (all
of them the first time), with owners, modes, ACLs, extended attributes (file
capabilities too), hard links, device nodes and holes. The services `backup.stop`
names are stopped while the files are read. The image is made from the last backup
(or empty file systems made with the node's identity), its files checked against
what the node sent, both file systems checked with their own fsck, and only then
given its final name.
"""

from __future__ import annotations

import codecs
import datetime
import gzip
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from builder import backup_image, bmap, card_backup, formats, image, layout as layouts, node_side, run
from builder.appliance import Appliance, Drive
from builder.backup_image import Entry, Listing
from builder.errors import BuildError, InputError
from builder.files import read_json, write_file, write_json
from builder.profile import Node, Profile

log = logging.getLogger(__name__)

FOLDER = "backups"
RECORDS = "backups.json"
MAX_ENTRIES = 5_000_000  # files in one file system's listing
MAX_LISTING = 1 << 30  # bytes of one listing, unpacked
STDERR_LIMIT = 1 << 20
SERVICE_WAIT = 60
FULL = 4 << 20  # bytes free on the output disk below which a failure is put down to a full disk  # seconds the services may take to be active again


# ------------------------------------------------------------ listings


ENTRY_RE = re.compile(rb"([fdlbcps]) (\d{1,20}) (\d{1,10}) (\d{1,20}) (\d{1,12}(?:\.\d{1,10})?) (\d{1,12}(?:\.\d{1,10})?) (\./.*|\.)",
                      re.S)


def parse_listing(packed: bytes, what: str, max_entries: int = MAX_ENTRIES) -> Listing:
    """A listing as the node sent it (gzip, NUL-ended entries): bounded, every entry checked."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as f:
            data = f.read(MAX_LISTING + 1)
    except (OSError, EOFError):
        raise BuildError(f"the node's listing of {what} is damaged") from None
    if len(data) > MAX_LISTING or data.count(b"\0") > max_entries:
        raise BuildError(f"the node's listing of {what} is larger than pibake reads ({max_entries} files)")
    listing: Listing = {}
    for raw in data.split(b"\0")[:-1]:
        m = ENTRY_RE.fullmatch(raw)
        if not m:
            raise BuildError(f"the node's listing of {what} holds an entry pibake cannot read")
        path = m[7].decode("utf-8", "surrogateescape")
        if "/../" in path + "/" or "/./" in path[1:] + "/" or "//" in path:
            raise BuildError(f"the node's listing of {what} holds a path that is not clean")
        listing[path] = Entry(m[1].decode(), int(m[2]), int(m[3]), int(m[4]), m[5].decode(), m[6].decode())
    if "." not in listing:
        raise BuildError(f"the node's listing of {what} is empty")
    return listing


def larger_than_card(listing: Listing, card_size: int, mount: str) -> None:
    """A file longer than the whole card is sparse, mostly holes: every byte of it would be read
    and hashed (hours for a few TiB), so it is refused by name before anything is read."""
    for path, entry in listing.items():
        if entry.kind == "f" and entry.size > card_size:
            raise BuildError(f"{formats.shown((mount.rstrip('/') + path[1:])[:300])} is a sparse file of {entry.size} bytes, "
                             f"more than the card's {card_size}: pibake would read every byte of it; move it off the card")


def changes(old: Listing, new: Listing) -> tuple[list[str], list[str]]:
    """What to send (new or changed, in the listing's order) and what to delete first
    (gone, or now of another kind), deepest first."""
    send = [path for path, entry in new.items() if old.get(path) != entry]
    gone = [path for path, entry in old.items() if path not in new or new[path].kind != entry.kind]
    return send, sorted(gone, key=lambda p: (-p.count("/"), p))


# ------------------------------------------------------------ the connection


class Link:
    """ssh to one node through output/ssh_config, every session over one connection."""

    def __init__(self, output: Path, node: str, folder: Path) -> None:
        self.output, self.node = output, node
        self.received = 0  # bytes the node sent on stdout
        self.base = ["ssh", "-F", "ssh_config", "-o", "BatchMode=yes", "-o", "ControlMaster=auto",
                     "-o", f"ControlPath={folder}/c", "-o", "ControlPersist=600",
                     "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=6", node]

    def ask(self, remote: str, what: str, input: bytes = b"", limit: int = node_side.FACTS_LIMIT,
            timeout: float = 600) -> bytes:
        done = run.bounded([*self.base, remote], input=input, timeout=timeout, limit=limit, cwd=str(self.output))
        self.received += len(done.stdout)
        if done.flooded:
            raise BuildError(f"{self.node}: {what}: it sent more than {limit >> 20} MiB")
        if done.timed_out:
            raise BuildError(f"{self.node}: {what}: no answer within {timeout:g} s")
        if done.returncode != 0:
            raise BuildError(f"{self.node}: {what}: {_said(done.stderr) or f'exit status {done.returncode}'}")
        return done.stdout

    def popen(self, remote: str, **kwargs) -> subprocess.Popen:
        log.debug("$ %s %s", " ".join(self.base), remote)
        return subprocess.Popen([*self.base, remote], cwd=str(self.output), **kwargs)

    def view(self, mount: str) -> str:
        """Where the node has the file system it mounts at `mount`."""
        return mount

    def close(self) -> None:
        subprocess.run([*self.base[:-1], "-O", "exit", self.node], cwd=str(self.output), capture_output=True)


def _said(stderr: bytes) -> str:
    lines = [line.strip() for line in formats.decoded(stderr[:STDERR_LIMIT]).splitlines() if line.strip()]
    return formats.shown(lines[-1][:300]) if lines else ""


# ------------------------------------------------------------ services


class Hold:
    """The node's `backup.stop` services, stopped while this holds; the node starts them
    again by itself when the holding session ends, however it ends."""

    def __init__(self, link: Link, units: tuple[str, ...]) -> None:
        self.link, self.units = link, units
        self.stopped: list[str] = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Hold":
        if not self.units:
            return self
        self.proc = self.link.popen(node_side.command(node_side.HOLD, *self.units), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline(4096).decode("ascii", "replace").strip()
        if not line.startswith("stopped:"):
            self.proc.kill()
            said = self.proc.stderr.read(STDERR_LIMIT) if self.proc.stderr else b""
            raise BuildError(f"{self.link.node}: cannot stop {', '.join(self.units)} for the backup: "
                             f"{line or _said(said) or 'no answer'}")
        self.stopped = [u for u in line[len("stopped:"):].split() if u in self.units]
        log.info("%s: stopped %s while its files are read", self.link.node, ", ".join(self.stopped) or "nothing")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the node's watcher sees the holding shell end, and starts them
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if exc[0] is None and self.stopped:
            self.wait_active()

    def wait_active(self) -> None:
        deadline = time.monotonic() + SERVICE_WAIT
        while True:
            answer = self.link.ask(node_side.command(node_side.ACTIVE, *self.stopped), "check its services")
            states = dict(line.split(" ", 1) for line in answer.decode("ascii", "replace").splitlines() if " " in line)
            down = [u for u in self.stopped if states.get(u) != "active"]
            if not down:
                return
            if time.monotonic() > deadline:
                raise BuildError(f"{self.link.node}: {', '.join(down)} did not start again after the backup")
            time.sleep(1)


# ------------------------------------------------------------ receiving


@dataclass
class Stream:
    """One file system's tar stream, as received."""

    path: Path
    size: int = 0
    changed: list[str] = field(default_factory=list)  # files tar saw change while it read them
    vanished: list[str] = field(default_factory=list)  # files gone between the listing and tar


C_QUOTED = re.compile(r'^tar: "((?:[^"\\]|\\.)*)": (.*)$')


def _c_unquote(text: str) -> str:
    """A name as tar --quoting-style=c wrote it (C escapes; other bytes as they are)."""
    raw = codecs.escape_decode(text.encode("utf-8", "surrogateescape"))[0]
    return raw.decode("utf-8", "surrogateescape")


def receive(link: Link, mount: str, names: list[str], target: Path, packed_bound: int | None = None) -> Stream:
    """Ask the node for `names` of the file system it mounts at `mount`, as one tar stream, into `target`.

    With `packed_bound`, the node packs the stream (gzip), which is unpacked here into at most
    that many bytes: what the listing says the files hold, and their headers."""
    what = mount
    stream = Stream(target)
    arrived = target.with_name(target.name + ".gz") if packed_bound is not None else target
    with open(arrived, "wb") as out, tempfile.TemporaryFile() as err:
        proc = link.popen(node_side.command(node_side.TAR, "gzip" if packed_bound is not None else "plain", view=link.view(mount)),
                          stdin=subprocess.PIPE, stdout=out, stderr=err)
        assert proc.stdin is not None
        feeder = threading.Thread(target=_feed, args=(proc.stdin, names), daemon=True)
        feeder.start()
        returncode = proc.wait()
        feeder.join()
        err.seek(0)
        said = err.read(STDERR_LIMIT).decode("utf-8", "surrogateescape")
        stream.size = os.fstat(out.fileno()).st_size
    link.received += stream.size
    exit_line = re.search(r"^tar-exit: (\d+)$", said, re.M)
    digest = re.search(r"^stream-sha256: ([0-9a-f]{64}) ", said, re.M)
    if returncode != 0 or not exit_line or not digest:
        raise BuildError(f"{link.node}: reading {what} stopped: {_said(said.encode()) or f'ssh exit {returncode}'}")
    if exit_line[1] not in ("0", "1"):  # 1: some files changed or vanished while read, named below
        raise BuildError(f"{link.node}: tar could not read {what}: {_said(said.encode())}")
    if image.sha256_file(arrived) != digest[1]:
        raise BuildError(f"{link.node}: what arrived of {what} is not what the node sent (sha256 differs)")
    if packed_bound is not None:
        _unpack(arrived, target, packed_bound, f"{link.node}: what it sent of {what}")
    for line in said.splitlines():
        m = C_QUOTED.match(line)
        if not m:
            continue
        name = _c_unquote(m[1])
        if "file changed as we read it" in m[2]:
            stream.changed.append(name)
        elif "No such file or directory" in m[2] or "File removed before we read it" in m[2]:
            stream.vanished.append(name)
    return stream


def packed_bound(listing: Listing, names: list[str]) -> int:
    """The most a tar stream of `names` can hold: their sizes, and for each a header with its
    extended attributes (an ext4 inode's fit in one 4 KiB block) and long name, in 512-byte blocks."""
    return sum(listing[n].size if n in listing else 0 for n in names) + 64 * 1024 * (len(names) + 2)


def _unpack(packed: Path, target: Path, bound: int, what: str) -> None:
    try:
        with gzip.open(packed, "rb") as f, open(target, "wb") as out:
            written = 0
            while chunk := f.read(1 << 20):
                written += len(chunk)
                if written > bound:
                    raise BuildError(f"{what} unpacks to more than its files hold ({bound >> 20} MiB)")
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise BuildError(f"{what} is not a gzip stream: {e}") from None
    finally:
        packed.unlink(missing_ok=True)


def _feed(pipe: BinaryIO, names: list[str]) -> None:
    try:
        for start in range(0, len(names), 4096):
            pipe.write(b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names[start:start + 4096]))
        pipe.close()
    except BrokenPipeError:
        pass


# ------------------------------------------------------------ records


@dataclass(frozen=True)
class Record:
    """One kept backup, as backups.json lists it."""

    name: str  # the image's file name
    sha256: str
    size: int
    received: int  # bytes the node sent for it
    files: int
    incremental: bool
    report: tuple[str, ...]


def folder(output: Path, node: str) -> Path:
    return output / FOLDER / node


def records(output: Path, node: str) -> list[dict]:
    data = read_json(folder(output, node) / RECORDS).get("backups", [])
    return [r for r in data if isinstance(r, dict) and isinstance(r.get("name"), str)
            and re.fullmatch(rf"{re.escape(node)}-\d{{8}}T\d{{6}}Z\.img", r["name"])
            and (folder(output, node) / r["name"]).is_file()] if isinstance(data, list) else []


def latest(output: Path, node: str) -> Path | None:
    kept = records(output, node)
    return folder(output, node) / kept[-1]["name"] if kept else None


def state_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name.removesuffix(".img") + ".state.json.gz")


def read_state(image_path: Path) -> dict:
    try:
        with gzip.open(state_path(image_path), "rb") as f:
            data = json.loads(f.read(MAX_LISTING))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, EOFError):
        return {}


def _listing_to_json(listing: Listing) -> dict:
    return {p: [e.kind, e.inode, e.links, e.size, e.mtime, e.ctime] for p, e in listing.items()}


def _listing_from_json(data: object) -> Listing:
    if not isinstance(data, dict):
        return {}
    try:
        return {str(p): Entry(str(v[0]), int(v[1]), int(v[2]), int(v[3]), str(v[4]), str(v[5])) for p, v in data.items()}
    except (TypeError, ValueError, IndexError, KeyError):
        return {}


# ------------------------------------------------------------ the whole backup


@dataclass(frozen=True)
class Result:
    path: Path
    received: int  # bytes over the connection
    files: int
    incremental: bool
    report: tuple[str, ...]  # what the user should know: files that changed while read


def stop_units(profile: Profile, node: Node) -> tuple[str, ...]:
    return tuple(profile.setting(f"{'master' if node.role == 'master' else 'workers'}.backup.stop"))


def backup(profile: Profile, node: Node, output: Path, keep: int | None = None,
           now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
           connect: Callable[[Path, str, Path], Link] = Link, device: str | None = None, force: bool = False) -> Result:
    """Back `node` up into output/backups/NODE/, and return what was kept: from the running
    node, or with `device`, from its card in a reader.

    `connect(output, node, folder)` makes the link to the node (ssh, unless a test's node is local)."""
    if device is None and profile.user.sudo != "nopasswd":
        raise InputError(f"pibake backup reads {node.hostname} as root, which needs sudo without a password: "
                         f"this profile has user.sudo: {profile.user.sudo} (set it to nopasswd)")
    if device is None and not (output / "ssh_config").is_file():
        raise InputError(f"{output / 'ssh_config'} is missing: build the images first (pibake build)")
    home = folder(output, node.hostname)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)  # backups hold the node's private keys
    previous = latest(output, node.hostname)
    old_state = read_state(previous) if previous else {}
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=home) as staging_name:
        staging = Path(staging_name)
        try:
            taken, received, digest = _read_and_make(profile, node, output, staging, old_state, previous, connect,
                                                     device, force)
        except (BuildError, OSError) as e:
            free = shutil.disk_usage(home).free
            if free < FULL:  # whatever failed first, a full disk is what to act on
                raise BuildError(f"{node.hostname}: no space left on the output disk ({home}, {free >> 20} MiB free): "
                                 "nothing was kept") from None
            if isinstance(e, OSError):
                raise BuildError(f"{node.hostname}: {e.strerror or e}: {e.filename or ''}: nothing was kept") from None
            raise
        final = home / f"{node.hostname}-{now():%Y%m%dT%H%M%SZ}.img"
        if final.exists():
            raise BuildError(f"{final} already exists: a backup of {node.hostname} was made this very second")
        for suffix in (".bmap", ".sha256"):
            os.replace(staging / f"new.img{suffix}", final.with_name(final.name + suffix))
        os.replace(staging / "new.state.json.gz", state_path(final))
        os.replace(staging / "new.img", final)
    files = sum(len(f.sums) for f in taken.fills)
    kept = [*[r for r in records(output, node.hostname) if r["name"] != final.name],
            {"name": final.name, "sha256": digest, "size": final.stat().st_size, "received": received,
             "files": files, "incremental": taken.incremental, "report": list(taken.report),
             "source": device or "live"}]
    write_json(home / RECORDS, {"node": node.hostname, "backups": kept}, 0o600, sync=True)
    if keep is not None:
        forget(output, node.hostname, keep)
    return Result(final, received, files, taken.incremental, taken.report)


def _read_and_make(profile: Profile, node: Node, output: Path, staging: Path, old_state: dict, previous: Path | None,
                   connect: Callable[[Path, str, Path], Link], device: str | None,
                   force: bool) -> tuple[backup_image.Taken, int, str]:
    """What was read, the bytes received, and the sha256 of staging/new.img, made and checked."""
    if device is not None:
        taken = card_backup.take(device, force, staging, output)
        return taken, 0, _make(staging, taken, previous if taken.incremental else None)
    with tempfile.TemporaryDirectory(prefix="pibake-ssh-") as control, Early(staging, previous) as early:
        link = connect(output, node.hostname, Path(control))
        try:
            taken = _from_node(link, profile, node, staging, old_state, early.begin)
        finally:
            link.close()
        return taken, link.received, _make(staging, taken, previous if taken.incremental else None, early)


class Early:
    """The new image, made and its appliance launched while the node's files arrive: the
    launch, under emulation, takes about as long as receiving a gigabyte."""

    def __init__(self, staging: Path, previous: Path | None) -> None:
        self.path, self.previous = staging / "new.img", previous
        self.grown: int | None = None
        self.appliance: Appliance | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def begin(self, layout: layouts.Layout, incremental: bool) -> None:
        self.grown = _new_image(self.path, layout, self.previous if incremental else None)
        self.thread = threading.Thread(target=self._launch, name="appliance", daemon=True)
        self.thread.start()

    def _launch(self) -> None:
        try:
            self.appliance = Appliance([Drive(self.path)])
        except BaseException as e:  # told in take()
            self.error = e

    def take(self) -> Appliance | None:
        """The launched appliance, now the caller's to close; None if none was begun."""
        if self.thread is None:
            return None
        self.thread.join()
        if self.error is not None:
            raise self.error
        appliance, self.appliance = self.appliance, None
        return appliance

    def __enter__(self) -> "Early":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.appliance is not None:
            self.appliance.close()


def _from_node(link: Link, profile: Profile, node: Node, staging: Path, old_state: dict,
               begin: Callable[[layouts.Layout, bool], None] = lambda layout, incremental: None) -> backup_image.Taken:
    """What the node holds, read; `begin(layout, incremental)` is told the backup's layout as soon
    as it is known."""
    facts = node_side.facts(link.ask(node_side.command(node_side.FACTS), "describe its card"))
    sized = layouts.sized(facts.layout)
    parts = [p for p in sized.partitions if p.mount in facts.mounts and p.fs is not None]
    listings = {p.mount: parse_listing(link.ask(node_side.command(node_side.LIST, view=link.view(p.mount)),
                                                f"list {p.mount}", limit=MAX_LISTING), p.mount) for p in parts}
    for mount, listing in listings.items():
        larger_than_card(listing, facts.layout.card_size, mount)
    same_card = bool(old_state) and old_state.get("disk_id") == sized.disk_id and bool(old_state.get("listings"))
    begin(sized, same_card)
    report: list[str] = []
    fills = []
    with Hold(link, stop_units(profile, node)):
        for p in parts:
            old = _listing_from_json(old_state.get("listings", {}).get(p.mount)) if same_card else {}
            send, gone = changes(old, listings[p.mount])
            # The next backup's changes come packed: little to pack, and often over Wi-Fi.
            packing = bool(old)
            streams = [receive(link, p.mount, send, staging / f"{p.number}.tar",
                               packed_bound(listings[p.mount], send) if packing else None)]
            again = streams[0].changed
            if again:  # read once more what changed while it was read; still changing: say so
                streams.append(receive(link, p.mount, again, staging / f"{p.number}-again.tar",
                                       packed_bound(listings[p.mount], again) if packing else None))
                report += [f"{p.mount.rstrip('/')}/{name[2:]} changed while it was read" for name in streams[1].changed]
            for name in streams[0].vanished:  # gone between the listing and tar
                listings[p.mount].pop(name, None)
                gone.append(name)
            contents = backup_image.read_streams([s.path for s in streams])
            sums = {k: v for k, v in old_state.get("sums", {}).get(p.mount, {}).items()
                    if k not in contents.sums and k in listings[p.mount] and k not in send} if same_card else {}
            sums.update({k: v for k, v in contents.sums.items() if k in listings[p.mount]})
            fills.append(backup_image.Fill(p, gone, [s.path for s in streams], sums, contents.xattrs))
    return backup_image.Taken(sized, fills, listings, same_card, tuple(report))


def _new_image(new: Path, layout: layouts.Layout, previous: Path | None) -> int | None:
    """`new`: a copy of the last backup, grown to `layout`, or empty file systems of its layout;
    the number of a partition grown (see _grow)."""
    if previous is not None:
        image.copy_image(previous, new)
        return _grow(new, layout)
    layouts.make_empty(new, layout)
    return None


def _make(staging: Path, taken: backup_image.Taken, previous: Path | None, early: Early | None = None) -> str:
    """staging/new.img and its companions, checked; its sha256."""
    new = staging / "new.img"
    appliance = early.take() if early is not None else None
    if appliance is not None and early is not None:
        grown = early.grown
    else:
        grown = _new_image(new, taken.layout, previous)
    backup_image.fill(new, taken.fills, grown, appliance)
    backup_image.check(new, taken.layout)
    os.chmod(bmap.write(new), 0o600)
    digest = image.sha256_file(new)
    write_file(staging / "new.img.sha256", f"{digest}  {new.name}\n", 0o600)
    state = {"disk_id": taken.layout.disk_id, "listings": {m: _listing_to_json(v) for m, v in taken.listings.items()},
             "sums": {f.partition.mount: f.sums for f in taken.fills}}
    write_file(staging / "new.state.json.gz", gzip.compress(json.dumps(state).encode(), 6, mtime=0), 0o600)
    os.chmod(new, 0o600)
    return digest


def _grow(path: Path, layout: layouts.Layout) -> int | None:
    """An earlier backup's copy, its root partition grown to the layout's size if smaller: then
    the partition's number, whose file system backup_image.fill grows."""
    root = layout.root
    table_now = layouts.table(run.run(["sfdisk", "--json", str(path)]).stdout)[2]
    size_now = next(p.size for p in table_now if p.number == root.number)
    if size_now >= root.size:
        return None
    with open(path, "r+b") as f:
        f.truncate(max(os.fstat(f.fileno()).st_size, layouts.image_size(layout)))
    run.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", str(root.number), str(path)],
            input=f"{root.start},{root.size}\n".encode(), what="cannot grow the root partition of the backup")
    return root.number


def forget(output: Path, node: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` backups of `node`."""
    kept = records(output, node)
    old, kept = kept[:max(0, len(kept) - keep)], kept[max(0, len(kept) - keep):]
    write_json(folder(output, node) / RECORDS, {"node": node, "backups": kept}, 0o600, sync=True)
    for record in old:
        path = folder(output, node) / record["name"]
        for extra in (path.with_name(path.name + ".bmap"), path.with_name(path.name + ".sha256"), state_path(path),
                      path.with_name(path.name.removesuffix(".img") + ".diff.json"), path):
            extra.unlink(missing_ok=True)
    return [r["name"] for r in old]
