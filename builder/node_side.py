"""What `pibake backup` runs on a node, as root, and how to read what it says.

Each script runs as `sudo -n sh -c SCRIPT sh ARGS…` over output/ssh_config, so the
node needs sudo without a password. A file system is read through a bind mount of it
alone on /mnt, in a mount namespace of the script's own (`unshare --mount`): nothing
mounted over it (/proc, /sys, /dev, /run, /boot/firmware …) is seen, its mount points
are, and nothing of it is visible on the node or outlives the script.

What a node sends is untrusted: every answer is bounded, parsed strictly and
checked before it reaches a command line or a file name.
"""

from __future__ import annotations

import base64
import re
import shlex
from dataclasses import dataclass

from builder import layout as layouts
from builder.errors import BuildError

# Run as `sh -c VIEW SCRIPT DIR ARGS…`: SCRIPT runs in /mnt, where DIR's file system
# alone is bound, with ARGS as its arguments.
VIEW = r"""
exec unshare --mount --propagation private sh -c '
mount --bind "$1" /mnt || exit 97
cd /mnt || exit 97
shift
eval "$0"
' "$0" "$@"
"""

FACTS = r"""
root=$(findmnt -n -o SOURCE --target /)
disk=/dev/$(lsblk -ndo PKNAME "$root")
echo "disk-size: $(blockdev --getsize64 "$disk")"
echo "table: $(sfdisk --json "$disk" | base64 -w0)"
findmnt -rn -o SOURCE,FSTYPE,TARGET | while read -r name fstype mount; do
    case "$name" in "$disk"?*) ;; *) continue ;; esac
    case "$fstype" in
    ext4) echo "ext4: $name $mount $(dumpe2fs -h "$name" 2>/dev/null | base64 -w0)"
          echo "used: $name $(df -B1 --output=used "$mount" | tail -n 1) $(df --output=iused "$mount" | tail -n 1)" ;;
    vfat) echo "fat: $name $mount $(head -c 512 "$name" | base64 -w0)"
          echo "used: $name $(df -B1 --output=used "$mount" | tail -n 1) 0" ;;
    esac
done
"""

# One entry per file: type, inode, links, size, mtime, ctime and path, the path last
# and the entry ended by a NUL, so that no name can pass for another entry. What is
# mounted afresh at boot is kept as an empty folder; the swap file is made again by
# dphys-swapfile at boot.
LIST = r"""
find . -xdev -path ./var/swap -prune -o \
    \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \) -prune \
    -printf '%y %i %n %s %T@ %C@ %p\0' -o -printf '%y %i %n %s %T@ %C@ %p\0' | gzip -1
"""

# The names to send come on stdin, NUL-ended. tar's own messages name a file in C's
# quoting; the stream's sha256, made here as it is sent, and tar's exit status end stderr.
# With "gzip" as its argument the stream is packed (gzip -1) before it is hashed and sent.
TAR = r"""
pack=cat
[ "$1" = gzip ] && pack="gzip -1"
{ tar --create --file=- --format=posix --numeric-owner --xattrs --xattrs-include='*' --acls --sparse \
      --no-recursion --null --verbatim-files-from --files-from=- --quoting-style=c --warning=no-file-ignored
  echo "tar-exit: $?" >&2
} | $pack | { tee /dev/fd/4 | sha256sum | sed 's/^/stream-sha256: /' >&2; } 4>&1
"""

# Stops the services given that are running, once a watcher outside this connection
# waits for this shell to end, however it ends, to start them again; holds until the
# operator closes stdin (or the connection drops).
HOLD = r"""
units=""
for unit in "$@"; do
    if systemctl is-active --quiet "$unit"; then units="$units $unit"; fi
done
if [ -n "$units" ]; then
    systemd-run --quiet --collect --unit="pibake-backup-$$" \
        sh -c "while kill -0 $$ 2>/dev/null; do sleep 1; done; systemctl start $units" || exit 98
    systemctl stop $units || { echo "cannot stop:$units"; exit 99; }
fi
echo "stopped:$units"
cat >/dev/null
"""

ACTIVE = r"""
for unit in "$@"; do echo "$unit $(systemctl is-active "$unit")"; done
"""

FACTS_LIMIT = 1 << 20


def command(script: str, *args: str, view: str = "") -> str:
    """The remote command line: `script` as root, with `args`; with `view`, run on that file system alone."""
    if view:
        return "sudo -n sh -c " + shlex.quote(VIEW) + " " + " ".join(map(shlex.quote, (script, view, *args)))
    return "sudo -n sh -c " + shlex.quote(script) + " sh " + " ".join(map(shlex.quote, args))


@dataclass(frozen=True)
class Facts:
    layout: layouts.Layout
    mounts: dict[str, str]  # mount point -> partition device on the node, for the file systems backed up


def facts(answer: bytes) -> Facts:
    """The node's card, from FACTS' answer."""
    if len(answer) > FACTS_LIMIT:
        raise BuildError("the node's description of its card is too long")
    lines = answer.decode("ascii", "replace").splitlines()
    values: dict[str, list[list[str]]] = {}
    for line in lines:
        key, sep, rest = line.partition(": ")
        if sep and key in ("disk-size", "table", "ext4", "fat", "used"):
            values.setdefault(key, []).append(rest.split(" "))
    try:
        card_size = int(values["disk-size"][0][0])
        label, disk_id, table = layouts.table(base64.b64decode(values["table"][0][0], validate=True))
    except (KeyError, IndexError, ValueError):
        raise BuildError("the node did not describe its card (findmnt, lsblk, sfdisk, blockdev)") from None
    by_node: dict[str, tuple[str, layouts.Ext4 | layouts.Fat]] = {}
    for kind in ("ext4", "fat"):
        for words in values.get(kind, []):
            if len(words) != 3 or not MOUNT_RE.fullmatch(words[1]):
                continue
            try:
                blob = base64.b64decode(words[2], validate=True)
            except ValueError:
                raise BuildError(f"the node sent a damaged description of {words[0]!r}") from None
            fs: layouts.Ext4 | layouts.Fat = layouts.ext4(layouts.fields(blob.decode("utf-8", "replace"))) if kind == "ext4" else layouts.fat(blob)
            by_node.setdefault(words[0], (words[1], fs))
    used = {w[0]: (int(w[1]), int(w[2])) for w in values.get("used", []) if len(w) == 3 and w[1].isdigit() and w[2].isdigit()}
    parts, mounts = [], {}
    for p in table:
        device = next((d for d in by_node if re.search(rf"\D{p.number}$", d)), None)
        mount, fs_of = by_node[device] if device else ("", None)
        if device:
            mounts[mount] = device
        size_used, inodes = used.get(device or "", (0, 0))
        parts.append(layouts.Partition(p.number, p.start, p.size, p.type, p.uuid, mount, fs_of, size_used, inodes))
    layout = layouts.Layout(label, disk_id, tuple(parts), card_size)
    if not any(p.mount == "/" and isinstance(p.fs, layouts.Ext4) for p in parts):
        raise BuildError("the node's root file system is not an ext4 partition of its card")
    return Facts(layout, mounts)


MOUNT_RE = re.compile(r"/[A-Za-z0-9_./-]{0,200}")
