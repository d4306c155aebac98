"""The repository stays small: a GPU run receives at most 64 MiB of working tree (tracked files and the
untracked ones git does not ignore), and committed results are summaries, figures and commands
(benchmarks/slim_results.py slims a results folder before it is committed). And its imports are layered:
the library never imports the applications (fastdelta.apps), and no modules import each other in a cycle."""
import ast
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREE_LIMIT = 15 * 10**6   # bytes, the whole tree
FILE_LIMIT = 2 * 10**6    # bytes, any one file


def tree_files() -> dict:
    """{path: size} of what a commit of this checkout would hold: the tracked files that exist and the
    untracked ones git does not ignore (what the GPU run carries too)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and not path.is_symlink():
            sizes[name] = path.stat().st_size
    return sizes


def where(sizes: dict, n: int = 8) -> str:
    """The largest folders (three levels deep) and files, for the failure message."""
    folders = Counter()
    for name, size in sizes.items():
        folders[os.path.join(".", *Path(name).parts[:-1][:3])] += size
    big = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return ("largest folders: " + ", ".join(f"{f} {s / 1e6:.1f} MB" for f, s in folders.most_common(n))
            + "; largest files: " + ", ".join(f"{f} {s / 1e6:.2f} MB" for f, s in big)
            + " (slim new results: python3 benchmarks/slim_results.py --palette FOLDER)")


def test_tree_under_15_mb():
    sizes = tree_files()
    total = sum(sizes.values())
    assert total <= TREE_LIMIT, f"the tree holds {total / 1e6:.1f} MB (limit {TREE_LIMIT / 1e6:.0f} MB); " + where(sizes)


def test_no_file_over_2_mb():
    sizes = tree_files()
    big = {name: size for name, size in sizes.items() if size > FILE_LIMIT}
    assert not big, f"files over {FILE_LIMIT / 1e6:.0f} MB: " + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in big.items())


def test_committed_results_are_slim():
    """What benchmarks/slim_results.py removes is not committed again: per-run history.png and full
    history.jsonl under a comparison's runs/, uncompressed report.json in committed results, and
    analysis.json without its device."""
    sizes = tree_files()
    results = [n for n in sizes if n.startswith("benchmarks/results/")]
    bulky = [n for n in results if "/runs/" in n and Path(n).name in ("history.png", "history.jsonl")]
    bulky += [n for n in results if Path(n).name == "report.json"]
    # a first seed's figure inputs say where they were computed (slim_results fills in compare's CPU)
    bulky += [n for n in results if Path(n).name == "analysis.json" and '"device"' not in (ROOT / n).read_text()]
    assert not bulky, (f"{len(bulky)} files that benchmarks/slim_results.py slims, e.g. {bulky[:3]}: run "
                       "python3 benchmarks/slim_results.py on their folder")


# -- import layering: the library below the applications, and no import cycles ---------------------------------

PACKAGE = ROOT / "fastdelta"
APPS = "fastdelta.apps"
# the package's entry points, which present the applications: `fastdelta.compare`, `python -m fastdelta`
ENTRY_POINTS = ("fastdelta", "fastdelta.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict:
    """{module name: path} of every module of the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, path: Path, node: ast.AST, modules: dict) -> set:
    """The package's modules an import statement names: its target and, for `from X import name`,
    X.name where that is a module."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "fastdelta"}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "fastdelta":
        return set()
    return {target} | {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}


def import_statements(tree: ast.Module, at_module_level: bool) -> list:
    """Every import statement, or only those a module runs when it is imported (not inside a function
    or a class, not under `if TYPE_CHECKING`)."""
    if not at_module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def import_graph(at_module_level: bool) -> dict:
    """{module: the package's modules it imports}. Importing a.b.c runs package a.b's __init__ first: it
    counts too, but not the root package nor the importing module's own packages (already running)."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in import_statements(tree, at_module_level):
            for target in imported(module, path, node, modules):
                parts = target.split(".")
                edges.add(target)
                edges |= {".".join(parts[:i]) for i in range(2, len(parts))
                          if not (module + ".").startswith(".".join(parts[:i]) + ".")}
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {t for t in edges if t in modules and t != module and t not in own_packages}
    return graph


def test_the_library_does_not_import_the_applications():
    """fastdelta.apps (cli, demo, bench, compare) is built on the library; no library module imports
    it, not even inside a function. Only the package's entry points present it."""
    upward = {m: sorted(t for t in targets if t == APPS or t.startswith(APPS + "."))
              for m, targets in import_graph(at_module_level=False).items()
              if not (m == APPS or m.startswith(APPS + ".")) and m not in ENTRY_POINTS}
    upward = {m: t for m, t in upward.items() if t}
    assert not upward, f"library modules importing the applications: {upward}"


def test_importing_the_library_loads_no_application():
    """`import fastdelta` in a fresh interpreter loads no fastdelta.apps module; fastdelta.compare loads them
    on first use, and `from fastdelta import compare` still works."""
    code = ("import sys, fastdelta; print(sorted(m for m in sys.modules if m.startswith('fastdelta.apps'))); "
            "from fastdelta import CompareSettings, compare; print(compare.__module__, fastdelta.compare is compare)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "fastdelta.apps.compare.comparison True"]


def test_no_import_cycles_between_modules():
    """The imports a module runs when it is imported form no cycle: each module can be read and
    imported on its own, from the modules below it."""
    graph = import_graph(at_module_level=True)
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_import_check_sees_what_it_checks():
    """The graph the two checks above read holds the imports they are about."""
    graph = import_graph(at_module_level=True)
    assert "fastdelta.settings" in graph["fastdelta.apps.cli"] and "fastdelta.attention" in graph["fastdelta.settings"]
    assert "fastdelta.apps.bench" not in graph["fastdelta.apps.cli"]
    # fastdelta presents compare from inside its __getattr__: seen by the check of every import, not at import
    assert "fastdelta.apps.compare" in import_graph(at_module_level=False)["fastdelta"]
    assert "fastdelta.apps.compare" not in graph["fastdelta"]
