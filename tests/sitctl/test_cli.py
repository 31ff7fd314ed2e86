import subprocess
import sys

from sitctl import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sitctl.cli", *args], capture_output=True, text=True, timeout=120)


def test_version_prints_package_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sitctl {__version__}"


def test_help_lists_the_stages():
    result = run_cli("--help")
    assert result.returncode == 0
    for stage in ("encode", "train", "sample", "eval"):
        assert stage in result.stdout
