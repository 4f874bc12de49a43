"""House rules that hold for the whole tree: each function, and each class with behaviour, of the
step and pipeline code reads on one screen. A config dataclass is a list of fields, each with its
help: it is exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 70  # about one screen: torchtune's train() is ~65 lines


def _is_dataclass(node: ast.AST) -> bool:
    return isinstance(node, ast.ClassDef) and any(
        "dataclass" in ast.unparse(decorator) for decorator in node.decorator_list)


def long_definitions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not _is_dataclass(node) and node.end_lineno - node.lineno + 1 > MAX_LINES]


@pytest.mark.parametrize("package", ["components", "pipelines"])
def test_no_definition_over_one_screen(package):
    found = [hit for path in sorted((ROOT / package).glob("*.py")) for hit in long_definitions(path)]
    assert not found, "over %d lines:\n%s" % (MAX_LINES, "\n".join(found))


def test_the_rule_sees_long_functions_and_classes_but_not_configs(tmp_path):
    body = "    x: int = 1\n" * MAX_LINES
    (tmp_path / "example.py").write_text(
        f"def f():\n{body}class C:\n{body}@dataclasses.dataclass\nclass Config:\n{body}")
    assert long_definitions(tmp_path / "example.py", tmp_path) == [
        f"example.py:1 f ({MAX_LINES + 1} lines)", f"example.py:{MAX_LINES + 2} C ({MAX_LINES + 1} lines)"]
