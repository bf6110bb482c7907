"""The README's two fresh-machine commands (main job, tests), read from its first section.

The first section (``## Quick start``) must hold exactly two ```bash blocks of one command each:
the first installs the package and trains the embedded default, the second installs the ``dev``
extra and runs the tests. ``.ci/run`` runs what this prints, so CI runs them exactly as written.

    python scripts/readme_commands.py            # both, one per line
    python scripts/readme_commands.py main       # the main job only
    python scripts/readme_commands.py tests      # the test command only
    python scripts/readme_commands.py main README.md   # from another README
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str | None = None) -> tuple[str, str]:
    """``(main_job, tests)`` from the first ``## `` section of the README."""
    text = README.read_text() if text is None else text
    sections = re.split(r"^## ", text, flags=re.M)
    if len(sections) < 2:
        raise ValueError("README.md has no '## ' section")
    blocks = re.findall(r"^```bash\n(.*?)^```", sections[1], flags=re.M | re.S)
    commands = [b.strip() for b in blocks]
    if len(commands) != 2 or any("\n" in c for c in commands):
        raise ValueError(f"README.md's first section must hold exactly two one-line ```bash blocks, found {commands}")
    return commands[0], commands[1]


def main(argv: list[str]) -> None:
    main_job, tests = readme_commands(Path(argv[1]).read_text() if len(argv) > 1 else None)
    which = argv[0] if argv else "both"
    if which not in ("both", "main", "tests"):
        raise SystemExit(f"usage: {sys.argv[0]} [main|tests], got {which!r}")
    print({"main": main_job, "tests": tests, "both": f"{main_job}\n{tests}"}[which])


if __name__ == "__main__":
    main(sys.argv[1:])
