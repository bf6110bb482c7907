"""The numbers of docs/guide/conditional.md: JEM against the plain classifier on the embedded digits.

    python scripts/evaluate_jem_digits.py --jem runs/digits_jem/version_0/checkpoints/last.ckpt \\
        --classifier runs/digits_classifier/version_0/checkpoints/last.ckpt

On the 359 held-out digits (the default split): test accuracy, ECE (15 bins) and NLL of both; OOD
AUROC of -E(x), the top softmax probability and -||grad_x E(x)|| against uniform noise,
pixel-shuffled and inverted held-out digits; for JEM the share of conditional samples
(``generate(n, y=k)``, 100 per class) that the plain classifier (trained on the training split
only) and the shipped digits feature network's head classify as the requested class, and the
digits FID of 1,000 unconditional samples against the held-out digits; and how well the 359 digits
resolve the difference of the two ECEs: a paired bootstrap (the same resamples for both models) of
ECE(JEM) - ECE(classifier), its 90 % interval and the share of resamples where JEM's is no worse.
"""

from __future__ import annotations

import argparse
import json

import torch

from lightning_ebm import EBM
from lightning_ebm.callbacks.classifier import OOD_SCORES, evaluate_classifier, ood_scores, ood_sets
from lightning_ebm.callbacks.fid import fid_score
from lightning_ebm.data import DigitsDataModule
from lightning_ebm.metrics import DigitsFeatures, auroc


def paired_ece_difference(logits_a: torch.Tensor, logits_b: torch.Tensor, y: torch.Tensor,
                          resamples: int) -> dict[str, float]:
    """ECE(a) - ECE(b) on the test set and over ``resamples`` bootstrap resamples of it, drawn once for both."""
    g = torch.Generator().manual_seed(0)
    diffs = []
    for _ in range(resamples):
        i = torch.randint(0, y.shape[0], y.shape, generator=g)
        diffs.append(evaluate_classifier(logits_a[i], y[i])["ece"] - evaluate_classifier(logits_b[i], y[i])["ece"])
    d = torch.tensor(diffs, dtype=torch.float64)
    return {"observed": evaluate_classifier(logits_a, y)["ece"] - evaluate_classifier(logits_b, y)["ece"],
            "bootstrap_sd": float(d.std()), "q05": float(d.quantile(0.05)), "q95": float(d.quantile(0.95)),
            "share_no_worse": float((d <= 0).double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jem", required=True)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--num_fid", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples for the ECE difference")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = DigitsDataModule(labels=True)
    data.setup()
    x, y = data.val_data, data.val_labels
    models = {"jem": EBM.load_from_checkpoint(args.jem).eval(),
              "classifier": EBM.load_from_checkpoint(args.classifier).eval()}
    out: dict = {}
    sets = ood_sets(x, torch.Generator().manual_seed(0))
    logits = {name: model.logits(x) for name, model in models.items()}
    for name, model in models.items():
        numbers = evaluate_classifier(logits[name], y)
        scores_in = ood_scores(model, x)
        for set_name, x_out in sets.items():
            scores_out = ood_scores(model, x_out)
            for score in OOD_SCORES:
                numbers[f"auroc/{set_name}/{score}"] = float(auroc(scores_in[score], scores_out[score]))
        out[name] = numbers
    out["ece_difference"] = paired_ece_difference(logits["jem"], logits["classifier"], y,
                                                  args.bootstrap)
    jem = models["jem"]
    g = torch.Generator().manual_seed(0)
    wanted = torch.arange(10).repeat_interleave(args.per_class)
    samples = jem.generate(wanted.shape[0], y=wanted, generator=g)
    features = DigitsFeatures()
    agree = {"classifier": models["classifier"].classify(samples),
             "digits_features": features.logits(samples).argmax(1)}
    for judge, predicted in agree.items():
        out["jem"][f"conditional/{judge}_agrees"] = float((predicted == wanted).float().mean())
    fake = jem.generate(args.num_fid, generator=torch.Generator().manual_seed(1))
    out["jem"]["fid"] = fid_score(x, fake, features)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
