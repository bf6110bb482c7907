"""Start-up time of the ``lightning-ebm`` command against ``python -c "import lightning"``.

Each command runs in a fresh process, interleaved over ``--rounds`` rounds; the table gives the
median wall time and its ratio to importing Lightning alone (measured in the same run).

    python benchmarks/startup.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    'python -c "import lightning"': [sys.executable, "-c", "import lightning"],
    'python -c "import lightning_ebm"': [sys.executable, "-c", "import lightning_ebm"],
    "lightning-ebm --help": [sys.executable, "-m", "lightning_ebm", "--help"],
    "lightning-ebm fit --help": [sys.executable, "-m", "lightning_ebm", "fit", "--help"],
    "lightning-ebm sample --help": [sys.executable, "-m", "lightning_ebm", "sample", "--help"],
    'python -c "from lightning_ebm import EBM"': [sys.executable, "-c", "from lightning_ebm import EBM"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times['python -c "import lightning"'])
    print("| command | median (s) | vs import lightning |\n|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| `{name}` | {med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
