"""The package's layer order (DESIGN.md §1; docs/layout.md): an import points to the same layer or
a lower one, never back up, and importing a module changes nothing outside it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "sapretrain"

# Top-level module or sub-package -> layer. A new one must be placed here (the test says so).
LAYERS = {
    "__init__": 0, "storage": 0, "config": 0, "jsonl": 0, "resources": 0, "distributed": 0, "tars": 0,
    "relations": 0, "jobs": 0,
    "shards": 1,
    "model": 2, "losses": 2, "detector": 2, "boxes": 2,
    "data": 3, "scenes": 3,
    "features": 4, "curation": 4, "train": 4, "eval": 4,
    "api": 5, "export": 5, "cli": 5,
}


def _unit(module: str) -> str:
    """``sapretrain.shards.writer`` -> ``shards``; ``sapretrain`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, root: Path = PROJECT_ROOT) -> list[tuple[int, str]]:
    """Every sapretrain module ``path`` imports, at any depth (function-level imports included)."""
    parts = path.relative_to(root).with_suffix("").parts
    package = ".".join(parts[:-1])  # a module's package; an __init__'s own package
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "sapretrain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import writer
                    found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
                    continue
            else:
                target = node.module or ""
            if target.split(".")[0] != "sapretrain":
                continue
            if target == "sapretrain":  # from sapretrain import storage, jsonl (or __version__: a name)
                pkg = root / "sapretrain"
                found += [(node.lineno, f"sapretrain.{a.name}" if (pkg / a.name).is_dir()
                           or (pkg / f"{a.name}.py").is_file() else "sapretrain") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def test_every_module_has_a_layer_and_no_import_runs_back_up():
    unplaced, upward = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"
        if unit not in LAYERS:
            unplaced.add(unit)
            continue
        for line, target in _imports(path):
            other = _unit(target)
            if other not in LAYERS:
                unplaced.add(other)
            elif LAYERS[other] > LAYERS[unit] and unit != "__init__":
                upward.append(f"sapretrain/{rel}:{line} ({unit}, layer {LAYERS[unit]}) imports {target}"
                              f" (layer {LAYERS[other]})")
    assert not unplaced, f"modules without a layer in LAYERS: {sorted(unplaced)}"
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above is not vacuous: a lower module importing a higher one is reported."""
    fake = tmp_path / "sapretrain" / "shards" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from sapretrain.train.trainer import train\n    from . import writer\n")
    imports = _imports(fake, tmp_path)
    assert (2, "sapretrain.train.trainer") in imports and (3, "sapretrain.shards.writer") in imports
    assert LAYERS[_unit("sapretrain.train.trainer")] > LAYERS["shards"]


def test_importing_the_package_is_cheap_and_has_no_side_effects():
    """``import sapretrain`` and the caption/manifest readers pull in no torch, and importing the
    model registers nothing with open_clip (the loader and webdataset's openers:
    tests/test_tars.py::test_importing_the_loader_patches_nothing_and_the_opener_is_opt_in)."""
    code = (
        "import sys\n"
        "import sapretrain\n"
        "assert 'torch' not in sys.modules, 'import sapretrain imported torch'\n"
        "import sapretrain.curation.sources, sapretrain.shards.manifest\n"
        "assert 'torch' not in sys.modules, 'reading captions or a manifest imported torch'\n"
        "import open_clip\n"
        "models = set(open_clip.list_models())\n"
        "import sapretrain.model\n"
        "assert set(open_clip.list_models()) == models, 'importing sapretrain.model registered models'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
