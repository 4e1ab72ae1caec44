"""The package's public names: each resolves, and importing the package imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import lssf_lightning


def test_every_public_name_resolves():
    missing = [name for name in lssf_lightning.__all__ if getattr(lssf_lightning, name, None) is None]
    assert missing == []
    assert set(lssf_lightning.__all__) <= set(dir(lssf_lightning))


def test_importing_the_package_does_not_import_torch():
    # The console script imports the package first: it must start instantly and stay interruptible.
    code = "import sys, lssf_lightning; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_one_version_from_the_package_metadata():
    from importlib.metadata import version

    assert lssf_lightning.__version__ == version("lssf-lightning")
    done = subprocess.run([sys.executable, "-m", "lssf_lightning.cli", "--version"], capture_output=True,
                          text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"lssf-lightning {lssf_lightning.__version__}")
