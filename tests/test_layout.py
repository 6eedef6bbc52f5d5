"""The layout stays what the README says it is: no import cycle among mllama's modules (imports inside
functions included, and none of mllama's own modules imported inside a function to hide one), and
the README's architecture map names every C/C++ source file and every Python module, and nothing else."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "mllama"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported mllama module, inside a function) for every import statement of a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                 for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` names the submodule when there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        out += [(t, id(node) in functions) for t in targets if t in known]
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the mllama modules it imports, and the imports made inside functions."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    hidden = []
    for name, path in known.items():
        for target, in_function in imports(path, known):
            graph[name].add(target)
            if in_function:
                hidden.append(f"{name} imports {target} inside a function")
    return graph, hidden


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: every component of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_and_no_hidden_imports():
    graph, hidden = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 60  # the walk found the package
    assert not hidden, hidden
    assert not find_cycles(graph)


def test_the_checker_sees_a_hidden_cycle(tmp_path, monkeypatch):
    """Two modules importing each other, one of them inside a function, are caught twice over."""
    pkg = tmp_path / "mllama"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .. import b\n")
    (pkg / "b.py").write_text("from .sub.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph, hidden = import_graph()
    assert hidden == ["mllama.sub.a imports mllama.b inside a function"]
    assert find_cycles(graph) == [["mllama.b", "mllama.sub.a"]]


def readme_map() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    block = section[section.index("```") + 3:]
    block = block[:block.index("```")]
    paths = set()
    for token in re.findall(r"(?:csrc|python)/[\w./{},-]+", block):
        token = token.rstrip(".,")
        match = re.fullmatch(r"(.*)\{([\w,]+)\}", token)
        if match:
            paths |= {match.group(1) + ext for ext in match.group(2).split(",")}
        else:
            paths.add(token)
    return {p for p in paths if not p.endswith("/")}


def source_files() -> set[str]:
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "csrc", "python"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    tracked = [p for p in tracked if (ROOT / p).is_file()]
    if not tracked:  # not a git checkout (an sdist): walk the folders
        tracked = [str(p.relative_to(ROOT)) for d in ("csrc", "python") for p in (ROOT / d).rglob("*") if p.is_file()]
    return {p for p in tracked if p.endswith((".h", ".cpp", ".c", ".py"))}


def test_readme_map_lists_every_source_file():
    listed, present = readme_map(), source_files()
    assert not present - listed, f"missing from the README map: {sorted(present - listed)}"
    assert not listed - present, f"in the README map but not in the tree: {sorted(listed - present)}"


def test_the_installed_package_ships_its_type_marker_and_template():
    """PEP 561: type checkers read mllama's annotations only when the package carries py.typed."""
    from importlib.resources import files

    installed = files("mllama")
    assert installed.joinpath("py.typed").is_file()
    assert installed.joinpath("data", "llama32_vision_instruct.jinja").is_file()
