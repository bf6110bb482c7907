"""The experiment driver runs end to end at a tiny size, writes its tables and plot, and resumes."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import run as driver  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--data.init_args.batches_per_epoch=4",
        "--data.init_args.num_val=64", "--model.init_args.sampler.init_args.steps=3"]


def test_noise_ablation_driver_writes_results_and_resumes(tmp_path, capsys):
    args = ["noise", "--seeds", "0", "--noise_levels", "0", "0.01", "--jobs", "2", "--out", str(tmp_path),
            "--floor_draws", "3", "--dataset", "checkerboard", "--extra", *TINY]
    driver.main(args)
    first = capsys.readouterr().out
    assert first.count("$ -m lightning_ebm.cli fit") == 2 and first.count("--data.init_args.name=checkerboard") == 2
    out = tmp_path / "noise"
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["noise_std"]) for r in rows] == [0.0, 0.01]
    assert all(float(r["val/mmd_mean"]) > 0 and float(r["val/mmd_floor_mean"]) > 0 for r in rows)
    # the narrow-kernel MMD of the final generator, computed once by the driver after training
    assert all(float(r["eval/mmd_h0.25_mean"]) > 0 for r in rows)
    table = (out / "table.md").read_text()
    assert table.startswith("| noise_std |")
    assert "Data vs data (checkerboard) over 3 independent pairs of 2000 points" in table
    floor = json.loads((out / "floor.json").read_text())
    assert floor["mmd_min"] <= floor["mmd_mean"] <= floor["mmd_max"] and floor["mmd_std"] > 0
    assert floor["local_min"] <= floor["local_mean"] <= floor["local_max"] and floor["local_std"] > 0
    assert (out / "noise.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime for p in out.glob("*/result.json")}
    driver.main(args)  # everything is done: nothing runs again
    assert "$ -m lightning_ebm.cli" not in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime for p in out.glob("*/result.json")}


def test_density_comparison_driver_reports_the_three_kls(tmp_path, capsys):
    config = (ROOT / "configs" / "toy2d_density.yaml").read_text()
    config = config.replace("every_n_steps: 600", "every_n_steps: 4").replace("grid_size: 100", "grid_size: 30")
    config = config.replace("num_samples: 1000", "num_samples: 50")
    (tmp_path / "tiny_density.yaml").write_text(config)
    args = ["density", "--seeds", "0", "--datasets", "checkerboard", "--jobs", "1", "--out", str(tmp_path),
            "--density_config", str(tmp_path / "tiny_density.yaml"), "--extra", *TINY]
    driver.main(args)
    table = (tmp_path / "density" / "table.md").read_text().splitlines()
    assert table[0].startswith("| dataset | sampler | seed | KL(data‖q)")
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[:3] == ["checkerboard", "gd", "0"]
    kls = [float(c) for c in cells[3:6]]
    assert all(k >= 0 and k == k for k in kls)  # KLs are non-negative numbers, not NaN
    assert (tmp_path / "density" / "checkerboard_gd_seed0_density.png").is_file()


def test_digits_noise_ablation_driver_reports_digits_fid(tmp_path):
    config = (ROOT / "configs" / "digits.yaml").read_text()
    config = config.replace("num_samples: 1000", "num_samples: 200").replace("kid_subset_size: 300",
                                                                              "kid_subset_size: 100")
    (tmp_path / "tiny_digits.yaml").write_text(config)
    tiny = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--model.init_args.sampler.init_args.steps=2"]
    driver.main(["noise_digits", "--seeds", "0", "--noise_levels", "0", "0.01", "--jobs", "2", "--out",
                 str(tmp_path), "--config", str(tmp_path / "tiny_digits.yaml"), "--extra", *tiny])
    out = tmp_path / "noise_digits"
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| noise_std | runs | digits FID | KID | IS | wall (s) |"
    fids = [float(line.split("|")[3].split("±")[0]) for line in table[2:]]
    assert len(fids) == 2 and all(f > 0 for f in fids)
    assert (out / "noise_digits.png").read_bytes()[:4] == b"\x89PNG"


def test_objective_comparison_driver_reports_kls_mmd_and_plots(tmp_path, capsys):
    args = ["objectives", "--seeds", "0", "--datasets", "8gaussians", "--objectives", "NCE", "DRL", "--jobs", "2",
            "--out", str(tmp_path), "--floor_draws", "3", "--extra", *TINY]
    driver.main(args)
    out = tmp_path / "objectives"
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| dataset | objective | runs | KL(data‖exp(-E)/Z) | KL(data‖q)")
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in table[2:4])}
    assert set(rows) == {"NCE", "DRL"}
    assert float(rows["NCE"][3].split(" ± ")[0]) >= 0 and float(rows["NCE"][4].split(" ± ")[0]) >= 0
    assert rows["DRL"][4] == "—"  # the recovery chain is noisy: it has no generator density
    assert "Data vs data (8gaussians), MMD h=0.25 over 3 pairs" in table[-1]
    assert (out / "objectives_8gaussians.png").read_bytes()[:4] == b"\x89PNG"
