import subprocess
import sys

import pytest

from sitctl import __version__
from tests.helpers import run_cli


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


HEAVY = ("torch", "diffusers", "timm", "matplotlib", "webdataset", "h5py")


def _heavy_modules_loaded_by(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_command_line_and_its_help_load_no_torch():
    # The lazy imports at the CLI edge exist for this: `sitctl --help` answers without torch.
    assert _heavy_modules_loaded_by("import sitctl.cli") == "[]"
    help_run = "import sitctl.cli\nsys.argv = ['sitctl', '--help']\ntry:\n    sitctl.cli.main()\nexcept SystemExit:\n    pass"
    assert _heavy_modules_loaded_by(help_run) == "[]"
    train_help = help_run.replace("'--help'", "'train', '--help'")
    assert _heavy_modules_loaded_by(train_help) == "[]"


@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_negative_seed_is_one_error_line_not_a_traceback(command):
    done = run_cli(command, "--seed", "-1")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == ["error: --seed must be 0 or more, got -1"]
