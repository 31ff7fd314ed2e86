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


def test_usage_errors_exit_2_without_a_traceback():
    for args in (["train", "latents", "--modle", "SiT-XL/2"], ["trian"], ["eval", "fdi", "samples"]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and "Error:" in result.stderr


def test_a_user_error_is_one_line_on_stderr():
    result = run_cli("show", "no/such/artifact")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: no/such/artifact: no such artifact directory"]
