"""The import graph's floors: each part of the package imports only the parts below it.

Read from the source (every import, at module level or inside a function), so a new import
that reaches up a floor (the maths importing Ray's edge, the engine importing MLflow's)
fails here, with the line that does it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import toolkit

# bottom up; a part may import any part on a lower floor (and itself)
FLOORS = [
    ("redaction",),
    ("config", "errors"),
    ("locks",),
    ("datasets",),
    ("maths",),
    ("engine",),
    ("execution",),
    ("tracking",),
    ("stages",),
    ("preflight",),
    ("cli",),
]
PACKAGE = Path(toolkit.__file__).parent


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "toolkit"


def _imports(path: Path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(rel.parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if target == "toolkit" else [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("toolkit."):
                yield module, node.lineno, name


def test_every_part_of_the_package_is_on_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    on_floors = {part for floor in FLOORS for part in floor}
    assert parts == on_floors, f"not on a floor: {sorted(parts - on_floors)}; gone: {sorted(on_floors - parts)}"


def test_each_part_imports_only_the_floors_below_it():
    level = {part: i for i, floor in enumerate(FLOORS) for part in floor}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, line, target in _imports(path):
            src, dst = _part(module), _part(target)
            if src != dst and level.get(dst, -1) >= level[src]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({src}) imports {target} ({dst})")
    assert not upward, "imports that reach up (or across) a floor:\n" + "\n".join(upward)


def test_the_maths_floor_needs_neither_ray_nor_mlflow():
    heavy = []
    for path in sorted((PACKAGE / "maths").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            heavy += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("ray", "mlflow")]
    assert not heavy, heavy
