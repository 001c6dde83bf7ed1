"""A card read for an offline backup reads only what it is asked for: its read-ahead is off
while pibake holds it and as it was afterwards, whatever ends the read."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from builder import card_backup

MIB = 1 << 20


def _read_ahead(device: str) -> int:
    return int(subprocess.run(["blockdev", "--getra", device], capture_output=True, text=True, check=True).stdout)


def test_read_ahead_is_off_while_held_and_as_it_was_after(loops) -> None:
    card = loops.make(16 * MIB)
    was = random.choice([8, 256, 1024])  # sectors
    subprocess.run(["blockdev", "--setra", str(was), card.device], check=True)
    fd = os.open(card.device, os.O_RDONLY)
    try:
        with card_backup.no_read_ahead(fd, card.device):
            assert _read_ahead(card.device) == 0
        assert _read_ahead(card.device) == was
        with pytest.raises(KeyboardInterrupt):
            with card_backup.no_read_ahead(fd, card.device):
                raise KeyboardInterrupt
        assert _read_ahead(card.device) == was
    finally:
        os.close(fd)


def test_without_the_right_to_set_it_the_card_is_read_as_it_is(tmp_path) -> None:
    path = tmp_path / "not-a-device"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with card_backup.no_read_ahead(fd, str(path)):  # ENOTTY here, as EACCES for a user without CAP_SYS_ADMIN
            pass
    finally:
        os.close(fd)
