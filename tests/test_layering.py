"""The packages point one way: sitctl -> pipelines -> model. model/ imports neither; pipelines/ not sitctl/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"model": ("sitctl", "pipelines"), "pipelines": ("sitctl",)}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in a file, including imports inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_never_import_higher_ones(package):
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & set(FORBIDDEN[package]))
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from sitctl.errors import SitctlError\n")
    assert "sitctl" in imported_packages(planted)
