"""``nn.Module`` wrappers of the kdops losses, for drop-in use in training loops."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from torch import Tensor, nn

from kdops.ops.affinity import rkd_angle_loss, rkd_distance_loss, similarity_preserving_loss
from kdops.ops.attention_relation import attention_relation_loss
from kdops.ops.feature import attention_transfer_loss, hint_loss
from kdops.ops.fused_linear import fused_linear_distill_loss
from kdops.ops.kd import distill_loss
from kdops.ops.sparse_kd import sparse_distill_loss


def _options_repr(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


class _KeywordLoss(nn.Module):
    """A loss module whose constructor takes the loss function's keyword options: a subclass's
    ``__init__`` passes its ``locals()`` (its arguments, by name), kept as ``self.options`` for
    ``forward`` and shown by ``repr``."""

    def __init__(self, arguments: dict) -> None:
        super().__init__()
        self.options = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}

    def extra_repr(self) -> str:
        return _options_repr(self.options)


class DistillLoss(_KeywordLoss):
    """Module form of :func:`kdops.distill_loss`; the constructor takes its keyword options.

    >>> crit = DistillLoss(temperature=2.0, divergence="jsd", beta=0.5)
    >>> loss = crit(student_logits, teacher_logits, labels)  # normalizer=num_items_in_batch: sum / it

    K teachers: ``teacher_logits (K, ..., V)``, mixed with ``teacher_weights`` (K,) (default 1/K).
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
        teacher_weights: Optional[Union[Sequence[float], Tensor]] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                normalizer: Union[None, int, Tensor] = None) -> Tensor:
        return distill_loss(student_logits, teacher_logits, labels, normalizer=normalizer, **self.options)


class FusedLinearDistillLoss(_KeywordLoss):
    """Module form of :func:`kdops.fused_linear_distill_loss`; the constructor takes its keyword
    options, ``forward`` its tensors.

    >>> crit = FusedLinearDistillLoss(temperature=2.0, hard_weight=0.5)
    >>> loss = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)

    K teachers: lists of ``teacher_hidden`` / ``teacher_weight`` (/ ``teacher_bias``), mixed with
    ``teacher_weights`` (K,) (default 1/K).
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
        teacher_weights: Optional[Union[Sequence[float], Tensor]] = None,
        student_logit_scale: float = 1.0,
        student_softcap: Optional[float] = None,
        teacher_logit_scale: float = 1.0,
        teacher_softcap: Optional[float] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Union[Tensor, Sequence[Tensor]],
        teacher_weight: Union[Tensor, Sequence[Tensor]],
        labels: Optional[Tensor] = None,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Union[None, Tensor, Sequence[Optional[Tensor]]] = None,
        normalizer: Union[None, int, Tensor] = None,
    ) -> Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, normalizer=normalizer, **self.options,
        )


class SimilarityPreservingLoss(nn.Module):
    """Module form of :func:`kdops.similarity_preserving_loss` (Tung & Mori, 2019)."""

    def __init__(self, *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return similarity_preserving_loss(f_s, f_t, backend=self.backend)


class RKDLoss(nn.Module):
    """Relational KD (Park et al., 2019): ``distance_weight * rkd_distance_loss +
    angle_weight * rkd_angle_loss`` (defaults: the paper's 1 and 2); a zero weight skips its term.

    >>> crit = RKDLoss(distance_weight=25.0, angle_weight=50.0)
    >>> loss = crit(student_embeddings, teacher_embeddings)
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0, *, smooth_l1_beta: float = 1.0,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if not (distance_weight or angle_weight):
            raise ValueError("distance_weight and angle_weight must not both be 0")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.options = dict(smooth_l1_beta=smooth_l1_beta, backend=backend)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        terms = []
        if self.distance_weight:
            terms.append(self.distance_weight * rkd_distance_loss(f_s, f_t, **self.options))
        if self.angle_weight:
            terms.append(self.angle_weight * rkd_angle_loss(f_s, f_t, **self.options))
        return sum(terms[1:], terms[0])

    def extra_repr(self) -> str:
        return _options_repr(dict(distance_weight=self.distance_weight, angle_weight=self.angle_weight, **self.options))


class Adapter(nn.Module):
    """Learned map of student features to the teacher's width for :func:`kdops.hint_loss`: a
    linear map over dim 1 of ``(B, C_in)`` or ``(B, C_in, *spatial)`` features, i.e. a linear
    layer, or the 1x1 convolution ``nn.Conv2d(C_in, C_out, 1)`` on ``(B, C, H, W)`` maps."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.linear.in_features:
            raise ValueError(
                f"Adapter input must have {self.linear.in_features} channels in dim 1 (B, C, ...); "
                f"got shape {tuple(x.shape)}"
            )
        # contiguous(): a channels-last output's gradient breaks torch.compile's aot_eager backward
        return self.linear(x.movedim(1, -1)).movedim(-1, 1).contiguous()


class HintLoss(nn.Module):
    """Module form of :func:`kdops.hint_loss` (FitNets); ``adapter`` (e.g. :class:`Adapter`) is
    registered as a submodule, so its parameters train with the student.

    >>> crit = HintLoss(Adapter(64, 256))
    >>> loss = crit(student_features, teacher_features)
    """

    def __init__(self, adapter: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return hint_loss(f_s, f_t, self.adapter)


class AttentionTransferLoss(nn.Module):
    """Module form of :func:`kdops.attention_transfer_loss` (Zagoruyko & Komodakis, 2017)."""

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return attention_transfer_loss(f_s, f_t, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p!r}"


class SparseDistillLoss(_KeywordLoss):
    """Module form of :func:`kdops.sparse_distill_loss` (a top-k teacher, e.g. from
    :class:`kdops.cache.TeacherCache`); the constructor takes its keyword options.

    >>> crit = SparseDistillLoss(temperature=1.0, rest_mass="bucket")
    >>> loss = crit(student_logits, topk_logprobs, topk_indices, labels)
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        rest_mass: str = "ignore",
        hard_weight: float = 0.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())

    def forward(self, student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor,
                labels: Optional[Tensor] = None, normalizer: Union[None, int, Tensor] = None) -> Tensor:
        return sparse_distill_loss(student_logits, topk_logprobs, topk_indices, labels, normalizer=normalizer,
                                   **self.options)


class AttentionRelationLoss(_KeywordLoss):
    """Module form of :func:`kdops.attention_relation_loss`; the constructor takes its keyword
    options, ``forward`` the student's and the teacher's ``(a, b)`` pairs.

    >>> crit = AttentionRelationLoss(relation_heads=8)  # MiniLMv2 query-query relation
    >>> loss = crit(q_student, q_student, q_teacher, q_teacher, attention_mask=mask)
    """

    def __init__(
        self,
        *,
        relation_heads: Optional[int] = None,
        causal: bool = False,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        reduction: str = "mean",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())

    def forward(self, student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        return attention_relation_loss(student_a, student_b, teacher_a, teacher_b, attention_mask=attention_mask,
                                       **self.options)

