"""The distillation loss against values worked out by hand, its limits, CLS windows and padding."""
import math

import pytest
import torch

from job.squad.distillation import distillation_loss

PAD = 7.0  # a padding logit big enough to dominate any softmax it were part of


def one_window(student, teacher, start, end, real, alpha, temperature):
    """The loss of a single window whose start and end logits are the same rows."""
    s, t = torch.tensor([student]), torch.tensor([teacher])
    mask = torch.tensor([[1] * real + [0] * (len(student) - real)])
    return distillation_loss(s, s.clone(), torch.tensor([start]), torch.tensor([end]), t, t.clone(), mask,
                             alpha, temperature).item()


def test_hand_computed_value():
    # student: equal logits on the 3 real tokens, so p = 1/3 each at any temperature; CE(gold) = ln 3.
    # teacher: T * (0, ln 2, 0), so at temperature T its distribution is (1/4, 1/2, 1/4);
    # KL(teacher || uniform) = 2 * 1/4 * ln(3/4) + 1/2 * ln(3/2) = 1/2 * ln(9/8).
    T = 2.0
    loss = one_window([0.0, 0.0, 0.0, PAD], [0.0, T * math.log(2), 0.0, PAD], 1, 2, 3, alpha=0.25, temperature=T)
    assert loss == pytest.approx(0.25 * math.log(3) + 0.75 * T ** 2 * 0.5 * math.log(9 / 8), rel=1e-6)


def test_alpha_limits_and_temperature():
    torch.manual_seed(0)
    s, e, t1, t2 = (torch.randn(3, 6) for _ in range(4))
    gold_s, gold_e, mask = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 5]), torch.ones(3, 6)
    hard = distillation_loss(s, e, gold_s, gold_e, t1, t2, mask, 1.0, 2.0)
    model_loss = (torch.nn.functional.cross_entropy(s, gold_s) + torch.nn.functional.cross_entropy(e, gold_e)) / 2
    assert hard.item() == pytest.approx(model_loss.item(), rel=1e-6)  # alpha 1: the model's own QA loss
    soft = distillation_loss(s, e, gold_s, gold_e, t1, t2, mask, 0.0, 3.0)
    assert soft.item() == pytest.approx(
        distillation_loss(s, e, torch.tensor([4, 4, 4]), gold_e.flip(0), t1, t2, mask, 0.0, 3.0).item())  # no gold
    kl = sum(torch.nn.functional.kl_div(torch.log_softmax(x / 3, -1), torch.log_softmax(t / 3, -1), log_target=True,
                                        reduction="batchmean") for x, t in ((s, t1), (e, t2))) / 2
    assert soft.item() == pytest.approx(9 * kl.item(), rel=1e-5)  # T^2 * KL at temperature T
    # a student that already is its teacher has nothing to learn from it, at any temperature
    for T in (0.5, 1.0, 4.0):
        assert distillation_loss(s, e, gold_s, gold_e, s, e, mask, 0.0, T).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(s, e, gold_s, gold_e, t1, t2, mask, 1.5, 2.0)
    with pytest.raises(ValueError):
        distillation_loss(s, e, gold_s, gold_e, t1, t2, mask, 0.5, 0.0)


def test_a_window_without_the_answer_keeps_its_cls_label():
    # gold at CLS (0) for start and end: the hard part is -ln softmax(...)[0]
    logits = [2.0, 0.0, 1.0]
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1)))
    assert one_window(logits, logits, 0, 0, 3, alpha=1.0, temperature=2.0) == pytest.approx(expected, rel=1e-6)


def test_padding_never_counts():
    torch.manual_seed(1)
    s, e, t1, t2 = (torch.randn(2, 5) for _ in range(4))
    gold_s, gold_e = torch.tensor([1, 0]), torch.tensor([3, 0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    def loss_and_grads(extra_s, extra_t):
        ss, ee = (torch.cat([x, extra_s], 1).requires_grad_() for x in (s, e))
        tt1, tt2 = (torch.cat([x, extra_t], 1) for x in (t1, t2))
        padded = torch.cat([mask, torch.zeros(2, extra_s.shape[1], dtype=mask.dtype)], 1)
        loss = distillation_loss(ss, ee, gold_s, gold_e, tt1, tt2, padded, 0.5, 2.0)
        loss.backward()
        return loss.item(), ss.grad, ee.grad

    base, grad_s, grad_e = loss_and_grads(torch.zeros(2, 0), torch.zeros(2, 0))
    assert (grad_s[1, 3:] == 0).all()  # the second window's own padding
    for fill in (0.0, 50.0, -1e4):
        padded, pgs, pge = loss_and_grads(torch.full((2, 3), fill), torch.full((2, 3), -fill))
        assert padded == pytest.approx(base, rel=1e-6)
        assert torch.isfinite(pgs).all() and (pgs[:, 5:] == 0).all()
        assert torch.allclose(pgs[:, :5], grad_s, atol=1e-7) and torch.allclose(pge[:, :5], grad_e, atol=1e-7)
    # teacher logits stored only for real tokens (narrower than the batch): the same loss
    three = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    narrow = distillation_loss(s, e, gold_s.clamp(max=2), gold_e.clamp(max=2), t1[:, :3], t2[:, :3], three, 0.5, 2.0)
    wide = distillation_loss(s, e, gold_s.clamp(max=2), gold_e.clamp(max=2), t1, t2, three, 0.5, 2.0)
    assert narrow.item() == pytest.approx(wide.item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 100.0])  # QA_DISTILL_TEMPERATURE's bounds (job/settings.py)
def test_the_loss_and_its_gradients_stay_finite_at_the_temperature_bounds(temperature):
    """1e-46 was accepted: the teacher's logits over it overflowed fp32 and the student's weights went NaN."""
    from job.settings import MAX_TEMPERATURE, MIN_TEMPERATURE

    assert (MIN_TEMPERATURE, MAX_TEMPERATURE) == (0.1, 100.0)
    torch.manual_seed(0)
    big = 65504.0  # the largest fp16 logit the teacher cache keeps
    s = (torch.randn(4, 9) * 1e4).requires_grad_()
    t = torch.tensor([[big, -big] * 4 + [0.0]] * 4)
    mask = torch.tensor([[1] * 7 + [0] * 2] * 4)
    loss = distillation_loss(s, s * 0.5, torch.tensor([0, 3, 6, 0]), torch.tensor([1, 4, 6, 0]), t, -t, mask, 0.3,
                             temperature)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
