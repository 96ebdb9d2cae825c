"""The lesson keeps its own room: minisft/sft/ is the SFT algorithm, read in order, importing none of the machinery.

These tests read the import statements of every module (the graph, not the running program), so an import hidden
inside a function counts as much as one at the top.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minisft"
SFT = PACKAGE / "sft"
# What a file of the lesson may not use: the machinery's own tools (terminal output, flags, signals, processes,
# trackers, file caches and their checksums).
MACHINERY_PACKAGES = {
    "rich", "argparse", "signal", "multiprocessing", "concurrent", "fcntl", "socket", "hashlib", "shutil",
    "wandb", "mlflow", "trackio", "tensorboard", "comet_ml",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, wherever the import statement stands."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            # `from minisft.sft import labels` imports the module minisft.sft.labels
            found.update(f"{module}.{alias.name}" for alias in node.names if is_module(f"{module}.{alias.name}"))
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def own_imports(path: Path) -> set[str]:
    return {name for name in imports_of(path) if name.split(".")[0] == "minisft" and is_module(name)}


def reading_order() -> list[str]:
    """The files minisft/sft/__init__.py lists, in its order: the lesson's table of contents."""
    return re.findall(r"^\s*\d+\.\s+(\w+)\.py", (SFT / "__init__.py").read_text(), flags=re.M)


def test_the_table_of_contents_lists_every_file_of_the_lesson():
    files = sorted(path.stem for path in SFT.glob("*.py") if path.name != "__init__.py")
    assert sorted(reading_order()) == files


@pytest.mark.parametrize("name", reading_order())
def test_a_file_of_the_lesson_imports_only_the_lesson_before_it(name):
    earlier = {f"minisft.sft.{other}" for other in reading_order()[: reading_order().index(name)]}
    allowed = earlier | {"minisft", "minisft.sft", "minisft.errors"}
    imported = own_imports(SFT / f"{name}.py")
    assert imported <= allowed, f"sft/{name}.py imports {sorted(imported - allowed)}"
    tools = {module.split(".")[0] for module in imports_of(SFT / f"{name}.py")} & MACHINERY_PACKAGES
    assert not tools, f"sft/{name}.py imports the machinery's {sorted(tools)}"


def test_the_lesson_is_short_enough_to_read():
    lengths = {path.name: len(path.read_text().splitlines()) for path in SFT.glob("*.py")}
    assert all(length <= 300 for length in lengths.values()), {n: k for n, k in lengths.items() if k > 300}
    assert sum(lengths.values()) <= 2500, lengths


def test_no_module_of_minisft_imports_itself_through_others():
    graph = {module_name(path): own_imports(path) for path in PACKAGE.rglob("*.py")}
    # a package's __init__ is imported on the way to any of its modules; it is not an arrow of the design
    graph = {module: {name for name in names if not is_package(name)} for module, names in graph.items()}
    done, active = set(), []

    def visit(module):
        if module in active:
            raise AssertionError("import cycle: " + " -> ".join([*active[active.index(module) :], module]))
        if module in done:
            return
        active.append(module)
        for name in sorted(graph.get(module, ())):
            visit(name)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def is_package(name: str) -> bool:
    return PACKAGE.parent.joinpath(*name.split("."), "__init__.py").is_file()
