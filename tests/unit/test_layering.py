"""Every package module imports only from its own layer or earlier ones (order: megatron_r3/layers.py).

Reads imports with `ast` (module level and inside functions alike: a deferred import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_r3
from megatron_r3.layers import LAYERS

PACKAGE = Path(megatron_r3.__file__).parent

# (importer, imported) pairs that exist today and are being removed; this set only shrinks.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, package: Path = PACKAGE) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path, package).split(".")
    here = own if path.name == "__init__.py" else own[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            if base == "megatron_r3":
                found.update(f"megatron_r3.{alias.name}" for alias in node.names)
            elif base.startswith("megatron_r3."):
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("megatron_r3."))
    return found


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layering_violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        importer = _module_name(path, package)
        own = _layer(importer)
        if own is None:
            continue
        for imported in sorted(_imports(path, package)):
            other = _layer(imported)
            if other is None or (importer, imported) in KNOWN_VIOLATIONS:
                continue
            if LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{importer} ({own}) imports {imported} ({other})")
    return bad


def test_every_package_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS), f"folders {sorted(folders)} vs layers {LAYERS}: add the new folder to LAYERS"


def test_no_module_imports_a_later_layer():
    assert layering_violations() == []


def test_known_violations_still_exist():
    """An entry that no longer exists must be deleted from KNOWN_VIOLATIONS (the list only shrinks)."""
    stale = [pair for pair in KNOWN_VIOLATIONS
             if pair[1] not in _imports(PACKAGE.parent / (pair[0].replace(".", "/") + ".py"))]
    assert stale == []


def test_checker_catches_a_planted_upward_import(tmp_path):
    pkg = tmp_path / "megatron_r3"
    for layer in LAYERS:
        (pkg / layer).mkdir(parents=True)
        (pkg / layer / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "platform" / "bad.py").write_text("def f():\n    from megatron_r3.train.trainer import Trainer\n")
    (pkg / "replay" / "relative.py").write_text("from ..model import specs\n")
    (pkg / "train" / "good.py").write_text("from megatron_r3.platform import collectives\nfrom . import other\n")
    assert layering_violations(pkg) == [
        "megatron_r3.platform.bad (platform) imports megatron_r3.train.trainer (train)",
        "megatron_r3.replay.relative (replay) imports megatron_r3.model (model)"]
