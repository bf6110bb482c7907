"""The documentation: the site builds without warnings, and every code block runs or says why not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run\b.*-->\s*$")


def code_blocks(page: Path) -> list[tuple[int, str, bool, str]]:
    """``(line, language, marked_not_run, source)`` for every fenced block of a Markdown page."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match and match.group(1) != "":
            start, language = i, match.group(1)
            marked = i > 0 and bool(NOT_RUN.match(lines[i - 1]))
            i += 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, language, marked, "\n".join(body)))
        i += 1
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_code_block_runs_or_is_marked_not_run(page, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, language, marked, source in code_blocks(page):
        if marked:
            continue
        assert language == "python", (
            f"{page.name}:{line}: a ```{language} block must be preceded by '<!-- not-run: reason -->'"
        )
        try:
            exec(compile(source, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"{page.name}:{line}: code block failed: {error!r}") from error


def test_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
