"""The package's dependency rules, checked on its source: no import cycle (imports inside functions count),
leaf modules that import nothing of ours, and readers (report, results, ...) that load neither Ray nor torch."""
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tune_upl"
LEAVES = {"errors": set(), "layout": {"errors"}, "loss_axes": set(), "signals": {"errors"}, "facts": {"errors"},
          "gpu_memory": set()}  # a leaf and what it may import of ours
READERS = ("results", "report", "ablation", "figures", "importance", "retrieve")
# at module level a reader imports only leaf modules, the config and spec schemas (no torch, no Ray), or readers
READER_MAY_IMPORT = {"config", "spec", "references", *READERS}
HEAVY = ("ray", "adamp", "torch", "tune_upl.engine", "tune_upl.loop", "tune_upl.search", "tune_upl.trainable",
         "tune_upl.experiment")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.stmt, modules: set[str]) -> set[str]:
    """The package modules one import statement names (`from tune_upl import figures` counts too)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return set()
    parts = [name.split(".") for name in names]
    return {p[1] for p in parts if len(p) > 1 and p[0] == "tune_upl" and p[1] in modules}


def imports_of(path: Path, modules: set[str], top_level_only: bool = False) -> set[str]:
    """Package modules `path` imports, at any depth (or at module level only), skipping `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_one(other)
            elif top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        found.update(_imported(node, modules) if isinstance(node, ast.stmt) else set())
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    return found - {path.stem}


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    paths = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imports_of(path, set(paths), top_level_only) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as `[a, b, ..., a]`, or [] when the graph has none (depth-first search)."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        for successor in sorted(graph.get(node, ())):
            cycle = walk(successor, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = walk(start, [])
        if cycle:
            return cycle
    return []


def test_the_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert graph["retrieve"] >= {"engine", "saved_models"}  # the parser sees imports inside functions
    cycle = find_cycle(graph)
    assert not cycle, f"import cycle in tune_upl: {' -> '.join(cycle)}"


def test_leaf_modules_import_nothing_of_ours():
    graph = import_graph()
    for leaf, allowed in LEAVES.items():
        assert graph[leaf] <= allowed, f"tune_upl.{leaf} is a leaf module but imports {sorted(graph[leaf] - allowed)}"


def test_readers_import_only_leaves_config_spec_and_readers_at_module_level():
    everywhere, top = import_graph(), import_graph(top_level_only=True)
    leaves = {name for name, deps in everywhere.items() if deps <= set(LEAVES)}  # errors, layout, storage, ...
    for reader in READERS:
        extra = top[reader] - leaves - READER_MAY_IMPORT
        assert not extra, f"tune_upl.{reader} imports {sorted(extra)} at module level; import them inside a function"


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement`."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY)


def test_the_report_and_the_command_line_load_neither_ray_nor_torch():
    modules = loaded_after("import tune_upl.report, tune_upl.results, tune_upl.figures, tune_upl.importance, "
                           "tune_upl.cli, tune_upl.layout")
    assert "tune_upl.report" in modules
    assert not _heavy(modules), f"importing the report loads {_heavy(modules)}"


def test_the_retrieval_tool_loads_no_ray():
    modules = loaded_after("import tune_upl.retrieve")
    assert not [m for m in _heavy(modules) if m.split(".")[0] != "torch"]  # torch it needs: the embeddings


def test_planning_a_search_loads_no_ray():
    """Studies, spaces, the baseline and the grid are planned without Ray (`--dry-run`, benchmarks, tests)."""
    modules = loaded_after("import tune_upl.planning")
    assert "tune_upl.planning" in modules and not _heavy(modules), _heavy(modules)


def test_a_trials_error_is_the_last_line_of_its_error_file(tmp_path):
    """The trial line and the report both show this one line; the traceback stays in the file."""
    from tune_upl.layout import error_line

    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nTraceback (most recent call last):\n  File x\nRuntimeError: boom\n\n")
    assert error_line(error) == "RuntimeError: boom"
    assert error_line(tmp_path / "missing.txt") is None and error_line(None) is None
    error.write_text("\n")
    assert error_line(error) == "error"


def test_ray_beyond_its_documented_api_is_used_in_one_module_only():
    """Ray's private names (what an upgrade may change without notice) appear only in `ray_private`, whose
    tests name the Ray version they were written for."""
    private = ("_internal", "_fetch_trial", "run_metadata", "_Bracket", "RAY_AIR", "get_storage", "storage_filesystem",
               "trial_fs_path")
    found = {path.name for path in PACKAGE.glob("*.py") for name in private if name in path.read_text()}
    assert found == {"ray_private.py"}
