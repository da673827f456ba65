"""``nn.Module`` wrappers of the kdops losses, for drop-in use in training loops."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from kdops.ops.fused_linear import fused_linear_distill_loss
from kdops.ops.kd import distill_loss


class DistillLoss(nn.Module):
    """Module form of :func:`kdops.distill_loss`; the constructor takes its keyword options.

    >>> crit = DistillLoss(temperature=2.0, divergence="jsd", beta=0.5)
    >>> loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        *,
        temperature: float = 2.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        hard_weight: float = 0.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.options = dict(
            temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction, backend=backend,
        )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return distill_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearDistillLoss(nn.Module):
    """Module form of :func:`kdops.fused_linear_distill_loss`; the constructor takes its keyword
    options, ``forward`` its tensors.

    >>> crit = FusedLinearDistillLoss(temperature=2.0, hard_weight=0.5)
    >>> loss = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        hard_weight: float = 0.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.options = dict(
            temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction, chunk_size=chunk_size, backend=backend,
        )

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Optional[Tensor] = None,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
    ) -> Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
