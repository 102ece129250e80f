"""The layering of DESIGN.md as checks that fail: import-linter's contracts (pyproject.toml), and the rule that an
import inside a function is there only to load a heavy or optional dependency lazily, saying so in a comment."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "actors", "learner", "reward_servers", "bench")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_import_contracts_hold():
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("services/_upward.py", "import learner.learner", "import the learner"),  # the core reaching up
        ("actors/_sideways.py", "from learner import loop", "import the learner"),  # actors and learner apart
        (
            "services/_cycle.py",
            "def f():\n    import services.app.cli  # lazily",
            "entry package",
        ),  # even in a function
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, line, broken):
    """The contracts can fail: a copy of the code with one offending import is refused, naming the contract."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / module).write_text(line + "\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout
    assert broken in out.stdout, out.stdout[-3000:]


def function_level_imports() -> list[tuple[str, int, str, bool]]:
    """(file, line, statement, explained) of every import inside a function of the project's packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        here, above = lines[sub.lineno - 1], lines[sub.lineno - 2]
                        explained = "lazily" in here or above.strip().startswith("#") and "lazily" in above
                        found.append((str(path.relative_to(REPO)), sub.lineno, here.strip(), explained))
    return sorted(set(found))


def test_imports_inside_functions_only_load_heavy_or_optional_dependencies_lazily():
    unexplained = [f"{file}:{line}: {stmt}" for file, line, stmt, ok in function_level_imports() if not ok]
    assert not unexplained, "import at module level, or say why it must be lazy:\n" + "\n".join(unexplained)
