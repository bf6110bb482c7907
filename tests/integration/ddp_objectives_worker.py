"""One rank of the every-objective DDP test: launched twice by ``torch.distributed.run`` (see test_ddp_objectives).

For each objective named in the JSON spec file it trains the tiny EBM for a few steps under Lightning's
``ddp`` strategy (the process group is made by the first fit and reused by the next) and writes what this rank
ended with: the energy's parameters, the objective's own state and the logged metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from reliability_helpers import tiny_data, tiny_ebm, tiny_trainer

from lightning_ebm import energies, latents, objectives, samplers


def build(spec: dict) -> dict:
    """The module's components for one case: the objective and, where it needs them, energy/sampler/latent."""
    parts = {"objective": getattr(objectives, spec["objective"])(**spec.get("kwargs", {}))}
    for key, room in (("energy", energies), ("sampler", samplers), ("latent", latents)):
        if key in spec:
            name, kwargs = spec[key]
            parts[key] = getattr(room, name)(**kwargs)
    if "num_classes" in spec:  # a classifier read as an energy, on labelled data
        classes = spec["num_classes"]
        parts["energy"] = energies.ClassifierEnergy(energies.MLPEnergy(2, 16, 2, num_outputs=classes), classes)
    return parts


def main(spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    cases = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    for name, spec in cases.items():
        L.seed_everything(0)
        model = tiny_ebm(**build(spec))
        trainer = tiny_trainer(out / name, max_steps=3, strategy="ddp", devices=2, val_check_interval=3)
        trainer.fit(model, tiny_data(labels="num_classes" in spec))
        rank = trainer.global_rank
        result = {
            "parameters": torch.cat([p.detach().flatten() for p in model.energy.parameters()]).tolist(),
            "objective_state": {k: v.flatten().tolist() for k, v in model.objective.state_dict().items()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
