"""Argument checks shared by the loss families: each error names the argument at fault."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kdops._codes import DIVERGENCES, HARD_TARGET, KD_DIVERGENCES
from kdops.divergences import BETA_RANGES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_float_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {x.dtype}")
    return x


def check_logits(name: str, logits: object) -> int:
    """``logits (..., V)``: a float tensor with at least one dimension and ``V >= 1``; returns V."""
    check_float_tensor(name, logits)
    if logits.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (..., V); got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a vocabulary dimension V >= 1; got shape {tuple(logits.shape)}")
    return logits.shape[-1]


def check_same_device(**tensors: Optional[Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_labels(labels: Optional[Tensor], lead_shape: torch.Size, what: str) -> Optional[Tensor]:
    """``labels`` must be an integer tensor of shape ``lead_shape``; returned as int64."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None; got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the leading shape of {what}, {tuple(lead_shape)}; "
            f"got {tuple(labels.shape)}"
        )
    return labels.long()


def check_labels_in_range(labels: Tensor, ignore_index: int, vocab: int) -> None:
    """Eager check, on every device (one synchronisation on a GPU), that every counted label
    indexes the vocabulary; under torch.compile (no check) every backend's kernels give such a
    row a NaN loss and a NaN gradient row instead of reading out of bounds."""
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}"
        )


def check_topk_indices(topk_indices: Tensor, vocab: int) -> None:
    """Eager check, on every device (one synchronisation on a GPU), that each row of the ``[..., K]``
    ``topk_indices`` holds K distinct indices of the vocabulary: an index outside [0, V) would be
    read out of bounds (an int64 one past 2^31 would wrap to an int32 one inside), a repeated one
    would race in the kernels' gradient scatter and count twice in their sums. Under
    torch.compile (no check) every backend's kernels give a row with an index outside [0, V) a NaN
    loss and a NaN gradient row."""
    if torch.compiler.is_compiling() or not topk_indices.numel():
        return
    rows = topk_indices.reshape(-1, topk_indices.shape[-1])
    low, high = torch.aminmax(rows)
    ordered = rows.to(torch.int32).sort(dim=1).values  # as the kernels take them (exact once in range)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    any_outside, any_repeated = torch.stack([(low < 0) | (high >= vocab), repeated.any()]).tolist()
    if any_outside:  # (the row is found on this path only)
        outside = (rows < 0) | (rows >= vocab)
        row = int(outside.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"topk_indices must lie in [0, {vocab}); found {int(rows[row][outside[row]][0])} in row {row}")
    if any_repeated:
        row = int(repeated.nonzero()[0, 0])
        raise ValueError(f"topk_indices must be distinct within each row; row {row} repeats an index")


def check_options(
    *,
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    reduction: str,
    has_labels: bool,
    hard_target: bool = False,
) -> int:
    """Check the scalar options of a distillation loss; return the divergence code. ``hard_target``:
    the loss also takes ``divergence="hard"`` (DeiT's hard target, kdops.distill_loss only)."""
    names = KD_DIVERGENCES if hard_target else DIVERGENCES
    if divergence == HARD_TARGET and not hard_target:
        raise ValueError(
            f"divergence={HARD_TARGET!r} (DeiT's hard target) is taken by kdops.distill_loss only; this loss takes "
            f"one of {', '.join(map(repr, names))}")
    if divergence not in names:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, names))}; got {divergence!r}")
    code = names.index(divergence)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number; got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    if divergence in BETA_RANGES:
        low, high, low_inclusive = BETA_RANGES[divergence]
        ok = (low <= beta if low_inclusive else low < beta) and beta < high
        if not ok:
            interval = f"{'[' if low_inclusive else '('}{low}, {high})"
            raise ValueError(f"beta must lie in {interval} for divergence={divergence!r}; got {beta}")
    if not (0.0 <= hard_weight <= 1.0):
        raise ValueError(f"hard_weight must lie in [0, 1]; got {hard_weight}")
    if hard_weight > 0 and not has_labels:
        raise ValueError(f"hard_weight={hard_weight} > 0 needs labels; got labels=None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")
    return code


def check_linear(hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor,
                 bias_name: str, bias: Optional[Tensor]) -> None:
    """An lm_head's inputs: ``hidden (..., H)``, ``weight (V, H)``, ``bias (V,)`` or None, one float dtype."""
    check_float_tensor(hidden_name, hidden)
    check_float_tensor(weight_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must have shape (..., H); got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape (V, H) with H = {hidden_name}.shape[-1] = "
            f"{hidden.shape[-1]}; got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} must have the dtype of {hidden_name}; got {weight.dtype} and {hidden.dtype}")
    if bias is not None:
        check_float_tensor(bias_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name} must have the dtype of {weight_name}; got {bias.dtype} and {weight.dtype}")


# |sum(teacher_weights) - 1| allowed, checked in float64.
WEIGHT_SUM_TOL = 1e-6


def check_teacher_weights(teacher_weights: object, n_teachers: int, device: torch.device) -> Tensor:
    """The mixture weights of ``n_teachers`` teachers as a float64 tensor ``(K,)`` on ``device``:
    None gives ``1/K`` each; else a sequence or 1-D tensor of ``K`` finite numbers ``>= 0`` whose
    sum is 1 within ``WEIGHT_SUM_TOL`` (not normalised silently: divide by the sum yourself).
    Values of a tensor are not checked while torch.compile traces (that would sync / break the graph)."""
    if teacher_weights is None:
        return torch.full((n_teachers,), 1.0 / n_teachers, dtype=torch.float64, device=device)
    if isinstance(teacher_weights, Tensor):
        if teacher_weights.dim() != 1 or teacher_weights.shape[0] != n_teachers:
            raise ValueError(
                f"teacher_weights must have shape ({n_teachers},), one weight per teacher; got "
                f"{tuple(teacher_weights.shape)}"
            )
        if not (teacher_weights.is_floating_point() or teacher_weights.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"teacher_weights must be a float tensor; got {teacher_weights.dtype}")
        weights = teacher_weights.detach().to(device=device, dtype=torch.float64)
        if torch.compiler.is_compiling():
            return weights
        values = weights.tolist()
    else:
        try:
            values = [float(v) for v in teacher_weights]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise TypeError(
                f"teacher_weights must be None, a sequence of numbers or a 1-D tensor; got "
                f"{type(teacher_weights).__name__}"
            ) from None
        if len(values) != n_teachers:
            raise ValueError(
                f"teacher_weights must have {n_teachers} entries, one per teacher; got {len(values)}"
            )
        weights = torch.tensor(values, dtype=torch.float64, device=device)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"teacher_weights must be finite and >= 0; got {values}")
    total = math.fsum(values)
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(
            f"teacher_weights must sum to 1 (within {WEIGHT_SUM_TOL}); got {values} with sum {total!r} "
            "(divide them by their sum)"
        )
    return weights
