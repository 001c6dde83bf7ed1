"""Planning's last step: each node's plan played through against the base image.

Every node image starts as an exact copy of the base, so whatever a plan reads (the
lines it edits, whether a path exists, where a symlink leads) is read once from the
base and the plan is played through on the host, with every path checked where it
leads in the image. What comes out is each node's `Changes`, to write into its copy.
"""

from __future__ import annotations

import posixpath
from typing import Protocol

from builder.errors import BuildError, InputError, Place
from builder.plan import NodePlan
from builder.tree import Base, Changes, Tree


class BaseImage(Base, Protocol):
    """The base as the appliance reads it: also its free space, and many paths at once."""

    def free(self) -> int: ...

    def prefetch(self, paths: set[str]) -> None: ...


def prepare(plans: list[NodePlan], base: BaseImage) -> list[Changes]:
    """Every plan played through against the base, before any copy is changed (they all
    start equal), once the root file system is known to have room for each."""
    free = base.free()
    for plan in plans:
        if free < plan.bytes_needed:
            packages = (f" ({plan.install_room // 1024} KiB of it for the packages installed on first boot)"
                        if plan.install_room else "")
            raise BuildError(f"{plan.node.hostname}: the image's root file system is too full: {free // 1024} KiB "
                             f"free, pibake needs about {plan.bytes_needed // 1024} KiB{packages}")
    base.prefetch(paths_read(plans))
    return [realize(plan, base) for plan in plans]


def realize(plan: NodePlan, base: Base) -> Changes:
    tree = Tree(base, plan.release.boot_dir)
    node = plan.node.hostname
    changes = Changes()
    for op in plan.ops:
        try:
            op.play(tree, changes)
        except BuildError as e:
            raise e.within(node=node) from None
    _check_account(tree, *plan.renamed_to)
    for path, st in tree.state.items():
        changes.before[path] = tree.in_base(path).kind
        if tree.on_boot(path):
            if st.kind == "file":
                changes.boot_writes[path] = tree.contents[path]
            elif st.kind == "dir":
                changes.boot_mkdirs.append(path)
            elif st.kind == "link":
                raise BuildError(f"cannot make the symlink {path}: the boot partition is FAT", Place(node=node))
        elif st.kind != "absent":
            changes.root[path] = st
            if st.kind == "file":
                changes.contents[path] = tree.contents[path]
    # A folder the plan writes into that neither it nor the base has is made as tar or
    # mkdir -p would make it: root's, 0755.
    for path in list(changes.root):
        folder = posixpath.dirname(path)
        while folder != "/" and folder not in changes.root and tree.lstat(folder).kind == "absent":
            changes.parents.add(folder)
            folder = posixpath.dirname(folder)
    changes.boot_mkdirs.sort()
    return changes


def _check_account(tree: Tree, name: str, origin: Place) -> None:
    """After the first user is renamed, `name` names it alone: an account or group of that
    name in the base image (a system user, `sudo`, `adm`) would now be two of them."""
    if not name:
        return
    for path, what in (("/etc/passwd", "an account"), ("/etc/group", "a group")):
        entries = [line for line in tree.text(path).split("\n") if line.split(":", 1)[0] == name]
        if len(entries) > 1:
            others = [line for line in entries if ":1000:" not in line] or entries[1:]
            ids = others[0].split(":")[2] if len(others[0].split(":")) > 2 else "?"
            raise InputError(f"'{name}' is already {what} in the image ({path}, id {ids}): "
                             "choose another name for the login user", origin)


def paths_read(plans: list[NodePlan]) -> set[str]:
    """Every path the plans look at in the base, and the folders above them (resolving a
    path looks at each): what to ask the appliance for in one go."""
    paths = {path for plan in plans for op in plan.ops for path in op.reads()}
    folders = {path[:i] for path in paths for i, c in enumerate(path) if c == "/" and i}
    return paths | folders
