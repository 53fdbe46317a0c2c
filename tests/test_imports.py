"""The import graph runs one way: every import of the package, function-level ones included,
goes from a layer to a lower one (or stays inside its own folder/module)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "longvila_jax"

# Bottom to top. A unit is a top-level module or folder of the package; units of one layer
# do not import each other.
LAYERS = [
    {"atomic", "memory"},  # utilities
    {"data", "kernels"},  # host-side data (numpy, grain); attention kernels
    {"models"},
    {"parallel"},
    {"config", "distributed"},  # config checks against the layers below
    {"checkpoint", "configs"},  # models from configs; the packaged recipes
    {"interop", "train", "infer"},
    {"eval", "serve"},
    {"rl"},  # GRPO: a training run that asks eval's questions
    {"recipe"},  # the stages in order, each by its objective
    {"demo_r1"},  # the demo's R1 stages
    {"demo"},
    {"cli"},
]
RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "longvila_jax":  # `from longvila_jax import checkpoint`
                names = [f"longvila_jax.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("longvila_jax."):
                yield node.lineno, name


def test_every_import_goes_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        unit = relative.parts[0].removesuffix(".py")
        if unit == "__init__":
            continue
        assert unit in RANK, f"{relative}: unit {unit!r} has no layer in LAYERS"
        for line, name in _imports(path):
            target = _unit(name)
            assert target in RANK, f"{relative}:{line}: {name} is in no layer"
            if target != unit and RANK[target] >= RANK[unit]:
                wrong.append(f"{relative}:{line} imports {name} ({unit} -> {target})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_function_level_and_package_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from longvila_jax.train.loop import train\n"
                      "from longvila_jax import checkpoint\n")
    assert sorted(name for _, name in _imports(source)) == ["longvila_jax.checkpoint",
                                                            "longvila_jax.train.loop"]
