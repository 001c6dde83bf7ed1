"""builder/ext4_read.py on real file systems: what debugfs reads back from an image, against
what Python reads from the tree the file system was made from (mke2fs -d).

The names are a node's, so anything a name may hold is drawn: line breaks, quotes,
bytes that are not UTF-8, and debugfs's own echo ("debugfs: cat <12>"), in names and in
contents, so that neither a name nor a file's bytes can pass for the next answer.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from builder import ext4_read
from builder.errors import BuildError

OFFSET = 1 << 20
PIECES = [b"\n", b'"', b"'", b" ", b"\t", b"\\", b"#", b";", b"\xff", b"\xc3\xa9", b"debugfs: cat <12>\n",
          b"<2>", b"a", b"Z", b"0", b"."]
ANSWERS = b"debugfs: cat <12>\n/12/100644/0/0/a/5/\n\n"  # what debugfs's answers look like, in contents


def _name(rng: random.Random) -> bytes:
    while True:
        name = b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))
        if name not in (b".", b"..") and len(name) < 200:
            return name


def _tree(root: Path, rng: random.Random) -> None:
    """Folders three deep, files of many sizes (empty, one byte, over a MiB, sparse), hard and symbolic links, a fifo."""
    folders = [root]
    for _ in range(12):
        folder = os.path.join(bytes(rng.choice(folders)), _name(rng))
        os.makedirs(folder, exist_ok=True)
        if folder.count(b"/") - bytes(root).count(b"/") < 3:
            folders.append(Path(os.fsdecode(folder)))
    files = []
    for i in range(60):
        path = os.path.join(bytes(rng.choice(folders)), _name(rng))
        if os.path.lexists(path):
            continue
        size = rng.choice([0, 1, 17, 4096, 4097, 70_000, (1 << 20) + 3])
        with open(path, "wb") as f:
            if i % 7 == 0:  # sparse: a hole, then data
                f.seek(3 << 20)
            f.write(ANSWERS * (size // len(ANSWERS)) + rng.randbytes(size % len(ANSWERS)))
        files.append(path)
    for path in rng.sample(files, 5):
        link = os.path.join(bytes(rng.choice(folders)), _name(rng))
        if not os.path.lexists(link):
            os.link(path, link)
    os.symlink(b"../" + _name(rng), os.path.join(bytes(root), b"link"))
    os.mkfifo(os.path.join(bytes(root), b"fifo"))


def _image(tmp_path: Path, tree: Path) -> Path:
    part = tmp_path / "part.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(part), "64M"], check=True)
    image = tmp_path / "disk.img"
    with open(image, "wb") as out, open(part, "rb") as src:
        out.write(os.urandom(OFFSET))  # something else before it, as a partition table is
        while chunk := src.read(1 << 20):
            out.write(chunk)
    part.unlink()
    return image


def _python_sums(tree: Path) -> dict[str, str]:
    sums = {}
    for folder, _, names in os.walk(bytes(tree)):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    sums["." + os.fsdecode(path[len(bytes(tree)):])] = hashlib.sha256(f.read()).hexdigest()
    return sums


@pytest.mark.parametrize("seed", range(3))
def test_every_file_reads_back_as_python_reads_it(tmp_path: Path, seed: int) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _tree(tree, random.Random(seed))
    want = _python_sums(tree)
    assert any(b"\n" in os.fsencode(p) for p in want) or seed, "the draw holds a name with a line break"
    image = _image(tmp_path, tree)
    assert ext4_read.sums(image, OFFSET) == want
    entries = ext4_read.walk(image, OFFSET)
    walked = {"." + os.fsdecode(os.path.join(folder, name)[len(bytes(tree)):])
              for folder, dirs, names in os.walk(bytes(tree)) for name in dirs + names}
    assert set(entries) == walked | {"./lost+found"}
    assert entries["./fifo"][1] & 0o170000 == 0o010000
    assert entries["./link"][1] & 0o170000 == 0o120000


def test_a_changed_file_reads_back_changed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"A" * 10_000)
    (tree / "b").write_bytes(b"B" * 10_000)
    image = _image(tmp_path, tree)
    before = ext4_read.sums(image, OFFSET)
    data = image.read_bytes()
    at = data.index(b"B" * 4096, OFFSET)
    with open(image, "r+b") as f:
        f.seek(at + 100)
        f.write(b"x")
    after = ext4_read.sums(image, OFFSET)
    assert after["./a"] == before["./a"] and after["./b"] != before["./b"]


@pytest.mark.parametrize("damage", ["not a file system", "past the end"])
def test_what_is_not_a_file_system_is_said_in_one_line(tmp_path: Path, damage: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 << 20))
    offset = OFFSET if damage == "not a file system" else 8 << 20
    with pytest.raises(BuildError) as e:
        ext4_read.sums(image, offset)
    assert "\n" not in str(e.value) and str(e.value).startswith("debugfs cannot")


def test_a_folder_linked_twice_is_said_not_followed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    image = _image(tmp_path, tree)
    subprocess.run(["debugfs", "-w", "-R", "ln <2> /d/loop", f"{image}?offset={OFFSET}"], check=True, capture_output=True)
    with pytest.raises(BuildError, match="links folder inode 2 twice"):
        ext4_read.walk(image, OFFSET)


def test_files_kept_in_their_inodes_read_back_to_their_size(tmp_path: Path) -> None:
    """inline_data: debugfs writes a file under 60 bytes out to 60."""
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(7)
    for size in [0, 1, 5, 59, 60, 61, 100, 150, 4000, 5000]:
        (tree / f"f{size}").write_bytes(rng.randbytes(size))
    part = tmp_path / "part.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-I", "256", "-O", "inline_data", "-d", str(tree), str(part), "16M"],
                   check=True)
    assert "inline_data" in subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True).stdout
    assert ext4_read.sums(part, 0) == _python_sums(tree)


def test_owners_past_two_to_the_31_are_read(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"data")
    image = _image(tmp_path, tree)
    for field in ("uid", "gid"):
        subprocess.run(["debugfs", "-w", "-R", f"sif /f {field} 3000000000", f"{image}?offset={OFFSET}"], check=True,
                       capture_output=True)
    assert ext4_read.sums(image, OFFSET) == _python_sums(tree)


def test_a_listing_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(10):
        (tree / str(i)).write_bytes(b"")
    image = _image(tmp_path, tree)
    monkeypatch.setattr(ext4_read, "MAX_ENTRIES", 5)
    with pytest.raises(BuildError, match="more than the 5 entries"):
        ext4_read.walk(image, OFFSET)
    monkeypatch.setattr(ext4_read, "MAX_LISTING", 100)
    with pytest.raises(BuildError, match="more than pibake lists"):
        ext4_read.walk(image, OFFSET)
