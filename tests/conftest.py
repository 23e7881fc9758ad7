"""Shared test fixtures: where the shared data lives, and a scratch working directory."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("PYFLM_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
SIM = DATA / "sim-p212121-cbf"

if not SIM.is_dir():   # CI has ../shared beside the clone; without it the tests cannot mean anything
    raise RuntimeError(f"test data not found at {DATA} (set PYFLM_SHARED to the shared/ folder)")


def run_ipmosflm(deck, *args, cwd, timeout=600):
    """Run `ipmosflm ARGS << deck` as a user would, in cwd; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "pyflm.cli", *args], input=deck, text=True,
                          capture_output=True, cwd=cwd, timeout=timeout)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
