"""The package is layered: a module imports only from its own layer folder or lower ones.

    errors (0) ← ir (1) ← frontends (2) ← algorithms, backend (3) ← pipeline (4) ← passes (5)
    ← api (6: hmir/__init__, hmir/api.py) ← harness (7: zoo, MNIST, permutations)

Siblings of one rank (algorithms, backend) do not import each other. Every ``import`` counts,
also those inside functions, so a lazy import cannot hide an upward dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"hmir/ir": "hmir.ir", "hmir/algorithms": "hmir.algorithms", "hmir/backend": "hmir.backend",
           "hmir/pipeline": "hmir.pipeline", "hmir/harness": "hmir.harness",
           "passes": "hmir.passes", "frontends": "hmir.frontends"}
LAYERS = {  # layer: (rank, the module prefixes it holds)
    "errors": (0, ("hmir.errors",)), "ir": (1, ("hmir.ir",)), "frontends": (2, ("hmir.frontends",)),
    "algorithms": (3, ("hmir.algorithms",)), "backend": (3, ("hmir.backend",)),
    "pipeline": (4, ("hmir.pipeline",)), "passes": (5, ("hmir.passes",)),
    "api": (6, ("hmir", "hmir.api", "hmir._compat")), "harness": (7, ("hmir.harness",)),
}
RANK = {name: rank for name, (rank, _) in LAYERS.items()}
PREFIX = {prefix: name for name, (_, prefixes) in LAYERS.items() for prefix in prefixes}


def layer(module: str) -> str:
    """The layer a dotted module name belongs to (its longest prefix in LAYERS)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in PREFIX:
            return PREFIX[".".join(parts[:k])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    for folder, pkg in FOLDERS.items():
        if rel.as_posix().startswith(folder + "/"):
            rest = rel.relative_to(folder).with_suffix("").parts
            return ".".join((pkg, *rest)).removesuffix(".__init__")
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> list[tuple[int, str]]:
    """Every hmir module ``path`` imports, with its line (``from hmir import x`` names ``hmir.x``
    when ``x`` is a module, else ``hmir``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "hmir"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "hmir":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                sub_path = [ROOT / "hmir" / Path(*sub.split(".")[1:]), ]
                is_mod = any(p.with_suffix(".py").exists() or p.is_dir() for p in sub_path)
                out.append((node.lineno, sub if is_mod else node.module))
    return out


SOURCES = sorted(p for d in ("hmir", "passes", "frontends") for p in (ROOT / d).rglob("*.py"))


def test_every_module_has_a_layer():
    for p in SOURCES:
        layer(module_name(p))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_upward_import(path):
    me = module_name(path)
    mine = layer(me)
    bad = []
    for line, target in imports(path):
        theirs = layer(target)
        if theirs == mine or target == me:
            continue
        if RANK[theirs] >= RANK[mine]:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                       f"({theirs}, rank {RANK[theirs]}) from {mine} (rank {RANK[mine]})")
    assert not bad, "layering broken (move the shared type down to the lowest layer that needs " \
                    "it):\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check can fail: an ir module importing a pass is reported."""
    fake = ROOT / "hmir" / "ir" / "_layer_probe.py"
    try:
        fake.write_text("def f():\n    from hmir.passes.match import match\n")
        with pytest.raises(AssertionError, match="layering broken"):
            test_no_upward_import(fake)
    finally:
        fake.unlink()
