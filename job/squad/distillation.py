"""The distillation loss of a batch of QA windows: the gold spans and a teacher's start/end distributions.

Per window, on start and end logits alike (then averaged, as the model's own QA loss averages
them)::

    alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

over the window's real tokens only: padding is neither a candidate of the softmax nor a term of
the KL. ``_T`` is the softmax at temperature ``T``; the ``T^2`` keeps the soft part's gradients
the same size whatever ``T`` (Hinton et al., 2015). A window without the answer keeps its CLS
label (position 0) for the hard part; the soft part uses the teacher's whole distribution.
The batch's loss is the mean over its windows, like the model's own loss.

Pure: torch tensors in, a scalar tensor out; nothing of the job is read.
"""
from __future__ import annotations

import torch

# What a padding position's logit becomes: exp() of it is exactly 0 in fp32, yet it stays finite,
# so 0 * (its log-probability) is 0 and no NaN reaches the gradients (a -inf fill would).
_MASKED = -1e9


def distillation_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
                      end_positions: torch.Tensor, teacher_start: torch.Tensor, teacher_end: torch.Tensor,
                      mask: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The mean over windows of the loss above; logits (windows, tokens), positions (windows,), mask (windows, tokens).

    ``mask`` is true (or 1) on real tokens. Teacher logits may be narrower or wider than the
    student's (padded to another length): only the first ``tokens`` columns count, and the mask.
    """
    if not 0.0 <= alpha <= 1.0 or not temperature > 0:
        raise ValueError(f"alpha must be in [0, 1] and temperature above 0 (got {alpha}, {temperature})")
    real = mask.bool()
    width = start_logits.shape[1]
    parts = []
    for student, gold, teacher in ((start_logits, start_positions, teacher_start),
                                   (end_logits, end_positions, teacher_end)):
        student = student.float().masked_fill(~real, _MASKED)
        teacher = _fit(teacher.float(), width).masked_fill(~real, _MASKED)
        loss = 0.0
        if alpha > 0:
            log_p = torch.log_softmax(student, dim=-1)
            loss = loss + alpha * -log_p.gather(1, gold.long().clamp(0, width - 1).view(-1, 1)).squeeze(1)
        if alpha < 1:
            log_q = torch.log_softmax(teacher / temperature, dim=-1)
            log_p_t = torch.log_softmax(student / temperature, dim=-1)
            kl = (log_q.exp() * (log_q - log_p_t)).sum(dim=-1)
            loss = loss + (1 - alpha) * temperature ** 2 * kl
        parts.append(loss)
    return ((parts[0] + parts[1]) / 2).mean()


def _fit(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` cut or padded (with zeros, masked afterwards) to ``width`` columns."""
    if values.shape[1] >= width:
        return values[:, :width]
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
