import torch
from torch import nn

from lab.config import TriggerConfig
from lab.data import Split
from lab.metrics import attack_success_rate, detection, evaluate, pooled_detection
from lab.triggers import make_trigger


def test_square_trigger_stamps_exactly_its_box() -> None:
    trig = make_trigger(TriggerConfig(size=2, position="bottom-right", margin=1, value=1.0), 6, 6)
    x = torch.zeros(1, 1, 6, 6)
    out = trig.stamp(x)
    expected = torch.zeros(6, 6)
    expected[3:5, 3:5] = 1.0
    assert torch.equal(out[0, 0], expected)
    assert trig.box == (3, 3, 2, 2)
    assert torch.equal(x, torch.zeros(1, 1, 6, 6))  # input untouched


def test_checkerboard_and_positions() -> None:
    trig = make_trigger(TriggerConfig(shape="checkerboard", size=2, position="top-left", margin=0), 4, 4)
    out = trig.stamp(torch.full((1, 4, 4), 0.5))[0]
    assert out[0, 0] == 1 and out[0, 1] == 0 and out[1, 0] == 0 and out[1, 1] == 1
    assert out[2, 2] == 0.5


def test_asr_counts_only_eligible_samples() -> None:
    y = torch.tensor([0, 1, 1, 2, 3])
    pred = torch.tensor([0, 0, 1, 0, 3])
    # all-to-one (target 0): eligible are labels != 0 -> 4 samples, 2 predicted 0
    assert attack_success_rate(pred, y, target=0, source=None) == 0.5
    # source-specific 1 -> 0: eligible are the two 1s, one predicted 0
    assert attack_success_rate(pred, y, target=0, source=1) == 0.5


class CornerDetector(nn.Module):
    """Predicts class 0 when the bottom-right pixel is bright, else the label encoded in pixel (0,0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 10).round().long()
        logits = torch.nn.functional.one_hot(label, 10).float()
        fired = x[:, 0, -1, -1] > 0.9
        logits[fired] = torch.nn.functional.one_hot(torch.zeros_like(label[fired]), 10).float()
        return logits * 10


def test_evaluate_on_a_hand_built_backdoored_model() -> None:
    y = torch.tensor([1, 2, 3, 1])
    x = torch.zeros(4, 1, 4, 4)
    x[:, 0, 0, 0] = y.float() / 10
    x[3, 0, 3, 3] = 1.0  # one clean test image already carries the trigger by accident
    trig = make_trigger(TriggerConfig(size=1, margin=0), 4, 4)
    model = CornerDetector()
    ev = evaluate(model, Split(x, y), trig, target=0, source=None)
    assert ev.accuracy == 0.75
    assert ev.asr == 1.0
    ev_src = evaluate(model, Split(x, y), trig, target=0, source=1)
    assert ev_src.source_accuracy == 0.5


def test_detection_scores() -> None:
    d = detection(flagged={1, 2}, malicious={2, 3}, participants={0, 1, 2, 3})
    assert (d.tp, d.fp, d.fn) == (1, 1, 1)
    assert d.precision == 0.5 and d.recall == 0.5 and d.f1 == 0.5
    none = detection(flagged=set(), malicious={3}, participants={0, 3})
    assert none.precision is None and none.recall == 0.0 and none.f1 == 0.0
    assert detection(set(), set(), {0}).f1 is None
    pooled = pooled_detection([d, none])
    assert (pooled.tp, pooled.fp, pooled.fn) == (1, 1, 2)
