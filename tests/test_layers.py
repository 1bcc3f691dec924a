"""The package's shape: layers import only downward, no module reads another's private names,
and no module is too big to read. Each check reads the source with ``ast``, so it also covers
imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import ferrotunnel

PKG = Path(ferrotunnel.__file__).parent
#: Bottom to top. The top-level modules (kernel, codec facade, errors, config, auth, tls) are layer 0.
LAYERS = {"protocol": 1, "aio": 2, "server": 3, "client": 3, "cluster": 4, "cli": 5}
#: The kernel's twins are exempt from the size rule (they mirror the compiled modules line for line).
TWINS = {"_frames_py.py", "_pool_py.py", "_sched_py.py"}
MAX_LINES = 500


def modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        out[".".join(("ferrotunnel",) + rel.parts)] = path
    return out


def _package_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def layer_of(name: str) -> int:
    if name == "ferrotunnel" or name == "ferrotunnel.__init__":
        return max(LAYERS.values())  # the package root re-exports everything: only the top layer may import it
    pkg = _package_of(name)
    return LAYERS.get(pkg, 0)


def _resolve(module: str, node: ast.ImportFrom) -> List[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        is_pkg = parts[-1] == "__init__"
        parts = parts[:-1] if not is_pkg else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
        base = ".".join(parts + ([node.module] if node.module else []))
    if not node.module:  # "from . import tls": the names are modules
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def imports(module: str, path: Path) -> List[Tuple[str, int, List[str]]]:
    """(imported module, line, imported names) for every import of this package's modules."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "ferrotunnel"]
        elif isinstance(node, ast.ImportFrom):
            for target in _resolve(module, node):
                if target.split(".")[0] == "ferrotunnel":
                    out.append((target, node.lineno, [a.name for a in node.names]))
    return out


def layering_violations(mods: Dict[str, Path]) -> List[str]:
    bad = []
    for name, path in mods.items():
        if name.endswith(".__init__") and _package_of(name) == "" or name.endswith("__main__"):
            continue  # the package root and ``python -m`` re-export and run everything
        mine = layer_of(name)
        for target, line, _ in imports(name, path):
            theirs = layer_of(target)
            sibling = (theirs == mine and target != "ferrotunnel" and _package_of(target) != _package_of(name)
                       and mine > 0)
            if theirs > mine or sibling:
                bad.append(f"{_rel(path)}:{line} imports {target} (layer {theirs} from layer {mine})")
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(PKG))
    except ValueError:  # a patched copy in a test's tmp_path
        return path.name


def private_definitions(path: Path) -> Set[str]:
    """Underscore names a module defines: functions, classes, assignments (self._x too), slots."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
              and isinstance(node.value, (ast.Tuple, ast.List))):
            names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return {n for n in names if _private(n)}


#: Modules that may import the kernel's private modules: the selectors and facades of the kernel.
KERNEL_FACADES = {"ferrotunnel.frames", "ferrotunnel.pool", "ferrotunnel.scheduler", "ferrotunnel._impl",
                  "ferrotunnel._frames_py", "ferrotunnel._sched_py", "ferrotunnel._pool_py"}


def reach_through(mods: Dict[str, Path]) -> List[str]:
    defs = {name: private_definitions(path) for name, path in mods.items()}
    bad = []
    for name, path in mods.items():
        elsewhere = set().union(*(d for other, d in defs.items() if other != name)) - defs[name]
        for target, line, names in imports(name, path):
            last = target.rsplit(".", 1)[-1]
            if _private(last) and name not in KERNEL_FACADES:
                bad.append(f"{_rel(path)}:{line} imports the private module {target}")
            for n in names:
                if _private(n) and name not in KERNEL_FACADES:
                    bad.append(f"{_rel(path)}:{line} imports {n} from {target}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr in elsewhere:
                bad.append(f"{_rel(path)}:{node.lineno} reads .{node.attr}, defined in another module")
    return bad


def test_the_layers_are_folders():
    names = set(modules())
    for pkg in LAYERS:
        assert f"ferrotunnel.{pkg}.__init__" in names, f"no package ferrotunnel.{pkg}"


def test_no_package_imports_from_a_layer_above_it():
    assert layering_violations(modules()) == []


def test_the_layering_check_can_fail(tmp_path):
    mods = modules()
    bad = tmp_path / "core.py"
    bad.write_text(mods["ferrotunnel.protocol.core"].read_text() + "\nfrom ..aio.stream import VirtualStream\n")
    mods["ferrotunnel.protocol.core"] = bad
    assert any("protocol" not in v or "aio.stream" in v for v in layering_violations(mods))
    sib = tmp_path / "client.py"
    sib.write_text("from ..server.server import TunnelServer\n")
    assert layering_violations({"ferrotunnel.client.client": sib}) != []


def test_the_protocol_layer_imports_no_asyncio():
    for name, path in modules().items():
        if layer_of(name) <= 1:
            tree = ast.parse(path.read_text())
            used = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            used |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not {"asyncio", "uvloop", "socket"} & used, name


def test_no_module_reads_another_modules_private_names():
    assert reach_through(modules()) == []


def test_the_reach_through_check_can_fail(tmp_path):
    mods = modules()
    bad = tmp_path / "ingress.py"
    bad.write_text(mods["ferrotunnel.server.ingress"].read_text()
                   + "\n\ndef peek(stream):\n    return stream._rbuf\n\nfrom ..protocol.handshake import _FirstFrame\n")
    mods["ferrotunnel.server.ingress"] = bad
    found = reach_through(mods)
    assert any("._rbuf" in v for v in found) and any("_FirstFrame" in v for v in found)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if p.name not in TWINS
            for n in [len(p.read_text().splitlines())] if n > MAX_LINES}
    assert long == {}
