"""CI runs the README's two fresh-machine commands exactly as the README writes them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from readme_commands import readme_commands  # noqa: E402


def test_the_readme_gives_the_two_commands_a_fresh_machine_needs():
    main_job, tests = readme_commands()
    assert main_job.startswith("python3 -m venv .venv && ")
    assert ".venv/bin/pip install -e . &&" in main_job and "[" not in main_job  # no extras: what a newcomer runs
    assert main_job.endswith(".venv/bin/lightning-ebm fit --config configs/toy2d.yaml")
    assert '.venv/bin/pip install -e ".[dev]"' in tests and tests.endswith('-m pytest -m "not slow"')


def test_ci_runs_exactly_what_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/readme_commands.py main README.md" in ci and "scripts/readme_commands.py tests README.md" in ci
    assert 'bash -c "$main_job"' in ci and 'bash -c "$tests"' in ci


def fake_repo(tmp_path: Path, main_job: str, tests: str) -> Path:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "readme_commands.py", tmp_path / "scripts" / "readme_commands.py")
    (tmp_path / "README.md").write_text(
        f"# x\n\n## Quick start\n\nMain:\n\n```bash\n{main_job}\n```\n\nTests:\n\n```bash\n{tests}\n```\n\n"
        "## Other\n\n```bash\necho never\n```\n")
    return tmp_path


LEAVE_CKPT = "mkdir -p runs/toy2d/version_0/checkpoints && touch runs/toy2d/version_0/checkpoints/last.ckpt"


@pytest.mark.parametrize("main_ok, ckpt, tests_status, expected", [
    (True, True, 0, 0), (False, True, 0, 1), (True, False, 0, 1), (True, True, 3, 3), (True, True, 5, 5)])
def test_ci_script_runs_both_commands_in_order_and_fails_when_either_does(tmp_path, main_ok, ckpt, tests_status,
                                                                          expected):
    main_job = "echo main >> ran" + (f" && {LEAVE_CKPT}" if ckpt else "") + ("" if main_ok else " && false")
    repo = fake_repo(tmp_path, main_job, f"echo tests >> ran && exit {tests_status}")
    result = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == expected, result.stderr
    ran = (repo / "ran").read_text().split()
    assert ran == (["main", "tests"] if main_ok and ckpt else ["main"])
    if tests_status == 5:
        assert "collected no tests" in result.stderr
