"""The folders are the layers: method code (``fedmosaic_core``) knows nothing of Flower, the
benchmark or the apps, and no package or module imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmosaic_core", "fedmosaic_flower", "fedmosaic_cli", "drake_data", "server_app", "client_app")
METHOD_FORBIDDEN = ("flwr", "drake_data", "server_app", "client_app", "fedmosaic_flower", "fedmosaic_cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (lazy imports count)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, targets in _graph().items():
        source = module.split(".")[0]
        packages[source].update(t.split(".")[0] for t in targets if t.split(".")[0] != source)
    assert _cycle(packages) is None, " -> ".join(_cycle(packages) or [])


@pytest.mark.parametrize("path", sorted((ROOT / "fedmosaic_core").rglob("*.py")), ids=lambda p: p.name)
def test_method_code_imports_no_framework_benchmark_or_app(path: Path) -> None:
    bad = sorted(m for m in _imports(path) if m.split(".")[0] in METHOD_FORBIDDEN)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_the_method_loads_no_flower_and_no_benchmark() -> None:
    code = (
        "import sys, pkgutil, importlib, fedmosaic_core\n"
        "for m in pkgutil.walk_packages(fedmosaic_core.__path__, 'fedmosaic_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {METHOD_FORBIDDEN!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _scripts() -> list[Path]:
    """Every file with a ``__main__`` block: the bench scripts and the packages' entry points."""
    files = [*(ROOT / "bench").glob("*.py"), *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]
    return sorted(p for p in files if "__name__ == \"__main__\"" in p.read_text())


def test_script_finder_finds_the_bench_scripts() -> None:
    names = {p.name for p in _scripts()}
    assert {"bench_rela.py", "bench_pqlora.py", "group_oracle.py"} <= names


@pytest.mark.parametrize("path", _scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_is_typer(path: Path) -> None:
    imports = _imports(path)
    assert "argparse" not in imports, f"{path.relative_to(ROOT)} parses its command line with argparse"
    source = path.read_text()
    assert "typer" in imports or "sys.argv" not in source, f"{path.relative_to(ROOT)} reads sys.argv by hand"
