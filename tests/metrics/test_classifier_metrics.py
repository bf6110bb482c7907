"""AUROC and ECE against hand-computed values and torchmetrics; the offline OOD sets; the OOD scores."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from lightning_ebm.callbacks.classifier import evaluate_classifier, ood_scores, ood_sets
from lightning_ebm.metrics import auroc, expected_calibration_error, reliability_bins


def test_auroc_by_hand():
    # pairs (in, out): 3 > 1, 3 > 2, 2 > 1, 2 = 2 (a half), 1 = 1 (a half), 1 < 2: (4 + 0.5 + 0.5) / 6
    assert float(auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0]))) == pytest.approx(4 / 6)
    assert float(auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0]))) == 1.0
    assert float(auroc(torch.tensor([1.0]), torch.tensor([5.0]))) == 0.0
    with pytest.raises(ValueError, match="scores_out must be a non-empty 1-D tensor"):
        auroc(torch.ones(3), torch.ones(2, 2))


def test_auroc_matches_torchmetrics_and_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=g, dtype=torch.float64) + 1, torch.randn(3000, generator=g, dtype=torch.float64)
    b[:50] = a[:50]  # some ties
    labels = torch.cat([torch.ones(4000), torch.zeros(3000)]).long()
    assert float(auroc(a, b)) == pytest.approx(float(binary_auroc(torch.cat([a, b]), labels)), abs=1e-6)
    # P(X > Y) for X ~ N(1, 1), Y ~ N(0, 1) is Phi(1 / sqrt(2)) = 0.7602
    assert float(auroc(a, b)) == pytest.approx(0.7602, abs=0.015)


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (wrong); with bins of width 0.5 all four sit in
    # (0.5, 1]: mean confidence 0.75, accuracy 2/4, so ECE = |0.5 - 0.75| = 0.25
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 0])
    assert float(expected_calibration_error(probs, labels, num_bins=2)) == pytest.approx(0.25)
    conf, acc, count = reliability_bins(probs, labels, num_bins=2)
    assert count.tolist() == [0, 4] and conf[1] == pytest.approx(0.75) and acc[1] == pytest.approx(0.5)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(expected_calibration_error(perfect, torch.tensor([0, 1]))) == 0.0
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \(2,\)"):
        expected_calibration_error(perfect, torch.tensor([0.0, 1.0]))


def test_ece_matches_torchmetrics():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(2000, 10, generator=g), 1)
    labels = torch.randint(10, (2000,), generator=g)
    for bins in (5, 15):
        ours = float(expected_calibration_error(probs, labels, bins))
        assert ours == pytest.approx(float(multiclass_calibration_error(probs, labels, 10, n_bins=bins)), abs=1e-5)
    logits = torch.log(probs)
    out = evaluate_classifier(logits, labels)
    assert out["nll"] == pytest.approx(float(torch.nn.functional.nll_loss(logits.double(), labels)), rel=1e-6)


def test_ood_sets_are_what_they_say():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    sets = ood_sets(x, torch.Generator().manual_seed(1))
    assert set(sets) == {"uniform", "shuffled", "inverted"} and all(v.shape == x.shape for v in sets.values())
    torch.testing.assert_close(sets["inverted"], -x)
    # each image's pixels permuted: the same multiset of values per image, in another order
    assert torch.equal(sets["shuffled"].flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(sets["shuffled"], x)
    assert sets["uniform"].min() >= -1 and sets["uniform"].max() <= 1 and not torch.equal(sets["uniform"], x)
    rgb = torch.rand(2, 3, 4, 4, generator=g)
    shuffled = ood_sets(rgb, g, ["shuffled"])["shuffled"]  # a position's channels move together
    pixels = {tuple(p.tolist()) for p in rgb[0].flatten(1).T}
    assert {tuple(p.tolist()) for p in shuffled[0].flatten(1).T} == pixels


class Quadratic(torch.nn.Module):
    """E(x) = |x|^2 / 2, logits (x_0, -x_0): a model whose scores are known in closed form."""

    num_classes = 2
    device = torch.device("cpu")

    def __call__(self, x):
        return 0.5 * x.flatten(1).pow(2).sum(1)

    def logits(self, x):
        return torch.stack([x.flatten(1)[:, 0], -x.flatten(1)[:, 0]], 1)


def test_ood_scores_in_closed_form():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    s = ood_scores(Quadratic(), x)
    torch.testing.assert_close(s["energy"], torch.tensor([-12.5, 0.0, -0.5]))
    torch.testing.assert_close(s["grad_norm"], torch.tensor([-5.0, 0.0, -1.0]))  # grad E = x
    torch.testing.assert_close(s["max_softmax"], torch.sigmoid(2 * x[:, 0].abs()))
