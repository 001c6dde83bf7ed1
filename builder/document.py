"""A profile's YAML, read as a hostile file would be, with the place of every key.

A profile is at most 1 MiB of UTF-8 YAML without anchors, aliases or tags and at most
32 levels deep, refused before anything is built from the text. The document keeps the
line of every key (for `file:line` in every problem) and the text of every plain value
YAML 1.1 turned into something else (0644, NO, 1:30), so that a setting that is text
means what was typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from builder.errors import InputError, Place, Problem, ProfileError
from builder.files import read_regular

KeyPath = tuple[Union[str, int], ...]
PROFILE_LIMIT = 1 << 20  # bytes
MAX_DEPTH = 32  # nesting of mappings and lists

# libyaml's parser where PyYAML has it (Debian's does): a 50-node profile loads in a few
# milliseconds instead of forty.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Document:
    path: Path
    data: Any
    lines: dict[KeyPath, int]
    texts: dict[KeyPath, str]  # what was typed, where YAML 1.1 read a number or a boolean

    def raw(self, keypath: KeyPath) -> Any:
        """The value at `keypath` as parsed, or None where there is none."""
        node = self.data
        for key in keypath:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                return None
        return node

    def where(self, keypath: KeyPath, key: str = "") -> Place:
        """Where a key is: its file and line (its nearest present parent's), and its path as data."""
        present = keypath
        while present not in self.lines and present:
            present = present[:-1]
        return Place(file=str(self.path), line=self.lines.get(present, 1), key=key, setting=dotted(keypath))


def dotted(keypath: KeyPath) -> str:
    """A key path as the user reads it: ("workers", "nodes", 2, "mac") is workers.nodes[2].mac."""
    out = ""
    for key in keypath:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def pattern(keypath: KeyPath) -> str:
    """A key path as the settings table names it: ("workers", "nodes", 2, "mac") is workers.nodes[].mac."""
    out = ""
    for key in keypath:
        out += "[]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def read(path: Path) -> Document:
    """The profile at `path`: bounded, UTF-8, hardened YAML; ProfileError or InputError otherwise."""
    name = str(path)
    try:
        data = read_regular(path, PROFILE_LIMIT)
    except OSError as e:
        raise InputError(f"cannot read profile {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ProfileError([Problem(Place(file=name, line=line), f"not UTF-8 text (byte {e.start})")]) from None
    return Document(path, *_compose(text, name))


def _check_events(text: str, name: str) -> None:
    """Refuse what a profile never needs and a hostile one uses: anchors and aliases (an alias
    bomb grows exponentially), explicit tags (`!!python/...`), and deep nesting; before
    anything is built from the text."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        where = Place(file=name, line=event.start_mark.line + 1)
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ProfileError([Problem(where, "YAML anchors and aliases (&, *) are not allowed in a profile; "
                                               "write the value out")])
        if getattr(event, "tag", None) is not None and not _implicit(event):
            raise ProfileError([Problem(where, "YAML tags (!...) are not allowed in a profile")])
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ProfileError([Problem(where, f"nested more than {MAX_DEPTH} levels deep")])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _implicit(event: Any) -> bool:
    implicit = getattr(event, "implicit", False)
    return all(implicit) if isinstance(implicit, tuple) else bool(implicit)


def _compose(text: str, name: str) -> tuple[Any, dict[KeyPath, int], dict[KeyPath, str]]:
    """Parse YAML keeping the line of every key, for `file:line` messages, and the text of
    every unquoted scalar that YAML turned into something else (0644, NO, 1:30)."""
    loader = _Loader(text)
    try:
        try:
            _check_events(text, name)
            root = loader.get_single_node()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e)
            raise ProfileError([Problem(Place(file=name, line=mark.line + 1 if mark else None),
                                        f"not valid YAML: {problem}")]) from None
        lines: dict[KeyPath, int] = {}
        texts: dict[KeyPath, str] = {}
        problems: list[Problem] = []

        def build(node: yaml.Node, path: KeyPath) -> Any:
            lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                out: dict[str, Any] = {}
                for key_node, value_node in node.value:
                    key = str(key_node.value)
                    if key in out:
                        problems.append(Problem(Place(file=name, line=key_node.start_mark.line + 1), f"duplicate key '{key}'"))
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, path + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [build(item, path + (i,)) for i, item in enumerate(node.value)]
            try:
                value = loader.construct_object(node)
            except (yaml.YAMLError, ValueError, OverflowError):
                # A plain scalar YAML 1.1 reads as something it then cannot make (a date like
                # 2025-02-30, `=`): what was typed, for its setting's own check to judge.
                value = node.value
            if not node.style and value is not None and not isinstance(value, str):  # plain, unquoted
                texts[path] = node.value
            return value

        data = build(root, ()) if root is not None else {}
    finally:
        loader.dispose()
    if problems:
        raise ProfileError(problems)
    return data, lines, texts
