"""Shared fixtures: the repository's fixture files and the `moe-xray` CLI the package is checked
against (MOE_XRAY_BIN, else target/debug/moe-xray of CARGO_TARGET_DIR or the repository)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"


def cli_path():
    env = os.environ.get("MOE_XRAY_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("debug", "release"):
        p = target / profile / "moe-xray"
        if p.exists():
            return p
    return target / "debug" / "moe-xray"


@pytest.fixture(scope="session")
def cli():
    """Runs the CLI; returns its stdout (fails the test with stderr on a non-zero exit)."""
    exe = cli_path()
    if not exe.exists():
        pytest.fail(
            f"the moe-xray CLI is needed to compare against ({exe} is missing): "
            "run `cargo build -p moe-xray` or set MOE_XRAY_BIN"
        )

    def run(*args, cwd=None):
        p = subprocess.run(
            [str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd
        )
        if p.returncode != 0:
            pytest.fail(f"moe-xray {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
        return p.stdout

    return run


@pytest.fixture(scope="session")
def fixtures():
    return FIXTURES
