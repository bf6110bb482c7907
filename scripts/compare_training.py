"""Do the shipped configs train to bit-identical parameters with the code at ``--ref`` and now?

    python scripts/compare_training.py --ref c6f5037
    python scripts/compare_training.py --ref main --configs configs/toy2d.yaml --max-steps 100
    python scripts/compare_training.py --ref c6f5037 --configs configs/toy2d.yaml \
        --override=--model.init_args.generator_loss_weight=0.5 --override=--model.init_args.data_noise=0.05

For every config, trains twice through the ``lightning-ebm`` CLI (``EBMCLI``) on CPU, each in its
own process with one thread: once with the library as it was at ``--ref`` (exported with
``git archive`` into a temporary directory, imported through ``PYTHONPATH``) and once with the
current tree. The configs themselves are read from the current tree, so both runs train the
very same recipe; validation is off and the budget is ``--max-steps`` steps. Then every tensor
of the two final ``state_dict``s is compared with ``torch.equal`` and a table is printed. Exits 1
if any parameter differs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("configs/toy2d.yaml", "configs/digits.yaml", "configs/toy2d_density.yaml")

# run in a fresh interpreter whose PYTHONPATH holds the library under test
_DRIVER = """
import sys, torch
from lightning_ebm.cli import EBMCLI
config, max_steps, root, out, *overrides = sys.argv[1:]
cli = EBMCLI(args=["--config", config, f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
                   "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                   f"--trainer.default_root_dir={root}", *overrides], run=False)
cli.trainer.fit(cli.model, cli.datamodule)
assert cli.trainer.global_step == int(max_steps), cli.trainer.global_step
state = {k: v for k, v in cli.model.state_dict().items() if isinstance(v, torch.Tensor)}
torch.save({"state": state, "loss": float(cli.trainer.callback_metrics["train/loss"])}, out)
"""


def export(rev: str, dest: Path) -> str:
    """The tree of ``rev`` written into ``dest``; returns the full commit hash."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = dest / "ref.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return commit


def train(library: Path, config: Path, max_steps: int, work: Path, overrides: list[str]
          ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Final tensors, last training loss and wall seconds of one run with ``library`` on the path."""
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(library), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONHASHSEED": "0"}
    out = work / "final.pt"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _DRIVER, str(config), str(max_steps), str(work), str(out), *overrides],
                         cwd=work, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"training {config.name} with {library} failed:\n{run.stderr[-4000:]}")
    saved = torch.load(out, weights_only=True)
    return saved["state"], saved["loss"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="git revision to compare the current tree against")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--override", action="append", default=[],
                        help="an extra CLI argument for every run, e.g. --override=--model.init_args.alpha=0.2")
    parser.add_argument("--current", type=Path, default=ROOT,
                        help="the tree whose lightning_ebm and configs are 'now' (default: this checkout)")
    args = parser.parse_args(argv)
    current = args.current.resolve()
    rows, all_equal = [], True
    with tempfile.TemporaryDirectory(prefix="compare_training_") as tmp:
        tmp_path = Path(tmp)
        commit = export(args.ref, tmp_path)
        print(f"reference {args.ref} = {commit[:10]}; current tree {current}; {args.max_steps} steps, CPU, "
              f"1 thread; overrides {args.override}")
        for i, name in enumerate(args.configs):
            config = (current / name).resolve()
            # `num_threads` (a process setting, newer than some references) is left out for the reference:
            # both runs use one thread anyway
            ref_config = tmp_path / f"ref{i}.yaml"
            ref_config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                                          if not line.startswith("num_threads:")))
            ref, ref_loss, ref_s = train(tmp_path / "tree", ref_config, args.max_steps, tmp_path / f"ref{i}",
                                         args.override)
            cur, cur_loss, cur_s = train(current, config, args.max_steps, tmp_path / f"cur{i}", args.override)
            same_keys = ref.keys() == cur.keys()
            differing = [k for k in ref if k in cur
                         and not (ref[k].dtype == cur[k].dtype and torch.equal(ref[k], cur[k]))]
            equal = same_keys and not differing
            all_equal &= equal
            max_diff = max((float((ref[k].double() - cur[k].double()).abs().max()) for k in differing), default=0.0)
            rows.append((name, len(ref), "yes" if same_keys else "NO", len(differing), max_diff,
                         ref_loss, cur_loss, ref_s, cur_s, "IDENTICAL" if equal else "DIFFERENT"))
    header = ("config", "tensors", "same keys", "differing", "max |diff|", "loss ref", "loss now", "s ref",
              "s now", "verdict")
    widths = [max(len(header[j]), *(len(_fmt(r[j])) for r in rows)) for j in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths, strict=True)))
    return 0 if all_equal else 1


def _fmt(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
