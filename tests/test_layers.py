"""The package's layers, checked by parsing its imports (no module is imported).

Imports point down: faces -> ``mesh`` -> ``services`` -> ``p2p`` -> ``proto`` -> ``errors``.
Only ``p2p/`` imports libp2p; only ``p2p/_compat/`` touches libp2p's private attributes or
subclasses its classes; ``proto/`` imports no trio, no libp2p and reads no clock. No module
imports another that imports it back, even lazily or for type checking only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "modelnet_p2p"

#: Rank of each top-level part of the package; a module may import only from ranks <= its own,
#: and within one rank only without cycles.
RANKS: dict[str, int] = {
    "errors": 0,
    "log": 0,
    "proto": 1,
    "p2p": 2,
    "config": 3,
    "services": 4,
    "mesh": 5,
    "peer": 6,
    "threaded": 7,
    "testing": 7,
    "openai": 7,
    "dashboard": 7,
    "demo": 7,
    "cli": 8,
    "collab": 9,  # thin re-exports kept for documented import paths
    "demo_models": 9,
    "__init__": 10,
}

MAX_LINES = 800
PEER_MAX_LINES = 580


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = ["modelnet_p2p", *module.split(".")]
    if module == "__init__":
        base = ["modelnet_p2p"]
    elif not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, int]]:
    """Every ``modelnet_p2p`` module and external top-level package that ``module`` imports."""
    tree = ast.parse(MODULES[module].read_text())
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            out.append((target, node.lineno))
            if target.startswith("modelnet_p2p"):  # `from .pkg import module`
                for a in node.names:
                    sub = f"{target}.{a.name}"[len("modelnet_p2p.") :]
                    if sub in MODULES:
                        out.append((f"modelnet_p2p.{sub}", node.lineno))
    return out


def _internal(target: str) -> str | None:
    if target == "modelnet_p2p":
        return "__init__"
    if not target.startswith("modelnet_p2p."):
        return None
    name = target[len("modelnet_p2p.") :]
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _rank(module: str) -> int:
    return RANKS[module.split(".")[0]]


def test_every_module_has_a_layer() -> None:
    missing = sorted({m.split(".")[0] for m in MODULES} - set(RANKS))
    assert not missing, f"modules outside the layer table: {missing}"


def test_imports_point_down() -> None:
    bad = []
    for module in MODULES:
        for target, line in _imports(module):
            dep = _internal(target)
            if dep is not None and dep != module and _rank(dep) > _rank(module):
                bad.append(f"{module}:{line} imports {dep} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_circular_imports() -> None:
    graph = {
        m: {d for t, _ in _imports(m) if (d := _internal(t)) is not None and d != m} for m in MODULES
    }
    # A package's __init__ may re-export its own submodules; that is not a cycle back.
    for m, deps in graph.items():
        if _is_package(m):
            deps.difference_update({d for d in deps if d.startswith(m + ".")})
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "circular imports: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_p2p_imports_libp2p() -> None:
    bad = [
        f"{m}:{line}"
        for m in MODULES
        if not m.startswith("p2p")
        for target, line in _imports(m)
        if target == "libp2p" or target.startswith("libp2p.")
    ]
    assert not bad, f"libp2p imported outside p2p/: {bad}"


@pytest.mark.parametrize("banned", ["trio", "libp2p", "time", "datetime", "socket", "asyncio"])
def test_proto_is_sans_io(banned: str) -> None:
    bad = [
        f"{m}:{line}"
        for m in MODULES
        if m.startswith("proto")
        for target, line in _imports(m)
        if target == banned or target.startswith(banned + ".")
    ]
    assert not bad, f"proto/ imports {banned}: {bad}"


def _libp2p_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("libp2p"):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("libp2p")
            )
    return names


def test_only_compat_reaches_into_libp2p() -> None:
    """Outside ``p2p/_compat/``: no ``obj._private`` on anything but ``self``/``cls``, no libp2p subclass.

    (Our own classes share private state only through ``self``, so the rule also keeps one
    module from reaching into another's internals.)
    """
    bad = []
    for m, path in MODULES.items():
        if m.startswith("p2p._compat"):
            continue
        tree = ast.parse(path.read_text())
        libp2p_names = _libp2p_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    root = base
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in libp2p_names:
                        bad.append(f"{m}:{node.lineno} subclasses {ast.unparse(base)}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.endswith("_")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                bad.append(f"{m}:{node.lineno} touches {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_compat_shims_have_canaries() -> None:
    """Every module in ``p2p/_compat/`` has canary tests in ``tests/test_compat_<module>.py``."""
    compat = [m for m in MODULES if m.startswith("p2p._compat.")]
    here = Path(__file__).parent
    missing = [m for m in compat if not (here / f"test_compat_{m.rpartition('.')[2]}.py").exists()]
    assert not missing, f"_compat shims without canary tests: {missing}"


def test_modules_are_small() -> None:
    big = {}
    for m, path in MODULES.items():
        n = len(path.read_text().splitlines())
        if n > (PEER_MAX_LINES if m == "peer" else MAX_LINES):
            big[m] = n
    assert not big, f"modules over the size limit: {big}"


def test_ships_py_typed() -> None:
    assert (PKG / "py.typed").exists()
