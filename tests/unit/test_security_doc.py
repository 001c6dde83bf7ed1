"""Tier 1: SECURITY.md names tests that exist, and every test file it names is there.

Each rule's row names the tests that prove it (`file.py::test_name`, then more names
from the same file); a renamed or deleted test must not leave a rule unproven on paper.
"""

from __future__ import annotations

import ast
import re

from conftest import REPO


def named_tests() -> list[tuple[str, str]]:
    found = []
    for line in (REPO / "SECURITY.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", line):
            current = file or current
            assert current is not None, f"{name} in SECURITY.md without its file: {line}"
            found.append((current, name))
    return found


def test_every_test_security_md_names_exists() -> None:
    named = named_tests()
    assert len(named) > 40
    defined: dict[str, set[str]] = {}
    for file in {f for f, _ in named}:
        [path] = list((REPO / "tests").rglob(file))  # in its tier's folder
        tree = ast.parse(path.read_text())
        defined[file] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    missing = [f"{file}::{name}" for file, name in named if name not in defined[file]]
    assert not missing, missing


def test_every_boundary_has_its_section() -> None:
    text = (REPO / "SECURITY.md").read_text()
    for boundary in ("Profile → image", "Profile → the operator's files", "Node → operator", "Operator → disk",
                     "Network → cache", "Uplink → cluster"):
        assert re.search(rf"^## \d\. {re.escape(boundary)}$", text, re.M), boundary
