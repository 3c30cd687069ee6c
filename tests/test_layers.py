"""The package's layers: every module imports only from its own layer or the ones below it
(lazy imports inside functions included), so there is no import loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import from its own layer and any layer below.
LAYERS = [
    {"__init__", "errors", "io", "tables", "optim", "plots", "feature_cache", "precision"},
    {"data", "store", "backbones"},
    {"lean", "memory"},
    {"methods"},
    {"train", "profile", "domains"},
    {"training", "export"},
    {"bench", "demo", "federated"},
    {"commands", "cli"},
]
LAYER = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _part(module: str) -> str:
    """``da3.methods.base`` -> ``methods``; ``da3`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "da3").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "da3" or n.startswith("da3.")}
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in _modules()}
    assert parts <= set(LAYER), f"give these a layer in LAYERS: {sorted(parts - set(LAYER))}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_down_the_layers(module):
    path = _modules()[module]
    here = LAYER[_part(module)]
    upward = sorted(m for m in _imports(path) if LAYER.get(_part(m), 0) > here)
    assert not upward, f"{path.relative_to(SRC)} (layer {here}) imports from above: {upward}"


def test_the_root_module_imports_nothing_of_the_package_eagerly():
    """``da3/__init__`` names its exports lazily, so a module that takes ``__version__``
    from it pulls nothing else in."""
    tree = ast.parse((SRC / "da3" / "__init__.py").read_text())
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(getattr(n, "module", None) == "__future__" for n in eager)


def test_no_import_loop_between_modules():
    """Module by module (not just by layer): the graph of imports has no cycle."""
    mods = _modules()
    graph = {
        m: {i for i in _imports(p) if i in mods and i != m and not m.startswith(i + ".")}
        for m, p in mods.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                loop = trail[trail.index(n) :] + [n] if n in trail else [m, n]
                pytest.fail("import loop: " + " -> ".join(loop))
            if n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_a_name_registered_twice_is_an_error():
    from da3.backbones import list_backbones, register_backbone
    from da3.methods import list_methods, register_method
    from da3.methods.linear import LinearConfig

    with pytest.raises(ValueError, match="registered already"):
        register_method("linear", LinearConfig, "again")(lambda *a: None)
    with pytest.raises(ValueError, match="registered already"):
        register_backbone("resnet50", "again")(lambda weights: None)
    assert list_methods().count("linear") == 1 and list_backbones().count("resnet50") == 1
