"""The tree passes `ruff check` with the project's settings (pyproject.toml [tool.ruff]): no unused or undefined names."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing_in_the_packages_and_the_tests():
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "sitctl", "pipelines", "model", "tests"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stdout + found.stderr
