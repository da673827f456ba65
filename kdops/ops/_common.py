"""What the distillation families share: the options record, the custom-op plumbing (schemas
and backward returns by name), the two autograd wirings and the reduction epilogue.

Every distillation loss's options travel as one :class:`DistillOptions` from validation to the
kernel launchers; a custom op takes its fields as named scalars (its schema lists them) and
rebuilds the record. Two wirings of the gradient:

* saved gradient (:func:`register_saved_grad_autograd`): the kernel returns the row losses and
  their gradient to the logits at once; for a reduced loss the op returns the reduced loss and
  the kernel divides the gradient by the reduction's divisor (:func:`reduction_divisor`: the
  count of a mean, or ``normalizer``) in float32 before its one rounding, so that backward only
  scales it by ``grad_output`` (nothing when that is 1); for ``"none"`` by the row weights;
* lm_head ops (:func:`register_lm_head_autograd`, chunked or blockwise): with ``needs`` set the
  op computes the gradients to ``h``, ``w``, ``b`` in forward (the rows are then only summed:
  reduction ``"sum"`` / ``"mean"``), and backward scales them; without (reduction ``"none"``)
  the row weights are known only in backward, which runs the op again with them.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union, get_type_hints

import torch
from torch import Tensor

from kdops import reference
from kdops.ops import validation
from kdops.ops._chunked import LogitTransform
from kdops.ops.saved_grad import scale_saved_grad


class DistillOptions(NamedTuple):
    """The scalar options of a distillation loss, as every family's launchers take them::

        row = hard_weight * CE(s, label) + soft_weight * D(softmax(t / T), softmax(s / T))

    with ``soft_weight = (1 - hard_weight) * T**2`` (``* 1`` without the T^2 scaling) and ``D``
    the divergence of code ``divergence`` (the kd family's ``"hard"``: ``D = -log p_s[argmax p_t]``);
    rows whose label is ``ignore_index`` are 0."""

    divergence: int
    temperature: float
    beta: float
    hard_weight: float
    soft_weight: float
    ignore_index: int
    rest_bucket: bool = False  # sparse (top-k) teachers: rest_mass="bucket" (else "ignore")
    # the models' final-logit transforms (kdops.ops._chunked.LogitTransform): the kernels apply
    # them to the logits they read (their gradient is to the raw logits)
    student_logit_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: Optional[float] = None

    @property
    def student_transform(self) -> LogitTransform:
        return LogitTransform(self.student_logit_scale, self.student_softcap)

    @property
    def teacher_transform(self) -> LogitTransform:
        return LogitTransform(self.teacher_logit_scale, self.teacher_softcap)


_SCHEMA_TYPES = {int: "SymInt", float: "float", bool: "bool", Optional[float]: "float?"}
# The options as custom-op schema arguments, named as the record's fields.
OPTIONS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[t]} {name}" for name, t in get_type_hints(DistillOptions).items())


def distill_options(
    *, temperature: float, divergence: str, beta: float, hard_weight: float, scale_by_temperature_squared: bool,
    ignore_index: int, reduction: str, labels: Optional[Tensor], vocab: Optional[int],
    normalizer: Union[None, int, Tensor] = None, rest_bucket: bool = False,
    student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0, teacher_softcap: Optional[float] = None, hard_target: bool = False,
) -> DistillOptions:
    """The checked options of a call (errors name the argument); ``soft_weight`` is computed here only.
    Also checks ``normalizer`` against ``reduction`` and, with a hard-label term, that the checked
    ``labels`` index the ``vocab`` logits (``vocab`` None: the caller checks them against a
    vocabulary it alone knows). ``hard_target``: ``divergence="hard"`` is taken (kdops.distill_loss)."""
    code = validation.check_options(temperature=temperature, divergence=divergence, beta=beta,
                                    hard_weight=hard_weight, reduction=reduction, has_labels=labels is not None,
                                    hard_target=hard_target)
    check_normalizer(normalizer, reduction)
    if labels is not None and hard_weight > 0 and vocab is not None:
        validation.check_labels_in_range(labels, ignore_index, vocab)
    scale = temperature * temperature if scale_by_temperature_squared else 1.0
    return DistillOptions(code, float(temperature), float(beta), float(hard_weight),
                          float((1.0 - hard_weight) * scale), int(ignore_index), bool(rest_bucket),
                          *LogitTransform.checked("student", student_logit_scale, student_softcap),
                          *LogitTransform.checked("teacher", teacher_logit_scale, teacher_softcap))


# ------------------------------------------------------------------------------- custom ops


class OpArgs:
    """A custom op's schema arguments by name: ``bind`` names the ``inputs`` of ``setup_context``,
    ``grads`` builds backward's return (the named gradients, None for every other input: a list
    of Nones for a list of tensors)."""

    def __init__(self, arguments: str):
        self.schema = arguments.format(options=OPTIONS_SCHEMA)
        self.names = tuple(arg.split()[-1] for arg in self.schema.split(","))

    def bind(self, inputs: tuple) -> dict[str, Any]:
        return dict(zip(self.names, inputs))

    def options(self, inputs: tuple) -> DistillOptions:
        named = self.bind(inputs)
        return DistillOptions(*(named[field] for field in DistillOptions._fields))

    def no_grads(self, inputs: tuple) -> dict[str, Any]:
        """Backward's None for each input, in its structure: a list of Nones for a list of tensors
        (a list holding a None is one leaf for autograd: one None)."""
        return {name: [None] * len(x) if isinstance(x, list) and x and all(isinstance(e, Tensor) for e in x) else None
                for name, x in self.bind(inputs).items()}

    def grads(self, no_grads: dict[str, Any], **grads: Optional[Tensor]) -> tuple:
        """Backward's return: the named gradients, ``no_grads`` (see :meth:`no_grads`) elsewhere."""
        return tuple(grads.get(name, none) for name, none in no_grads.items())


def function_grads(ctx, *grads: Optional[Tensor]) -> tuple:
    """The return of an ``autograd.Function``'s backward: ``grads`` for its first inputs, None for the rest."""
    return (*grads, *(None,) * (len(ctx.needs_input_grad) - len(grads)))


def define(name: str, args: OpArgs, returns: str, impl: Callable, fake: Callable) -> torch.library.CustomOpDef:
    """The custom op ``kdops::<name>`` of schema ``(args) -> returns`` with its fake impl."""
    op = torch.library.custom_op(f"kdops::{name}", impl, mutates_args=(), schema=f"({args.schema}) -> {returns}")
    op.register_fake(fake)
    return op


def register_saved_grad_autograd(op: torch.library.CustomOpDef, args: OpArgs, wrt: str) -> None:
    """Autograd of an op returning ``(rows, grad)``, ``grad`` the gradient of the rows to input
    ``wrt`` computed in forward (when ``compute_grad``): backward is ``grad * grad_rows``, with
    ``rows`` the row losses ``[N]`` (``grad_rows`` ``[N]``: per-row weights) or one reduced loss
    (0-dim: ``grad`` is that of the reduced loss, ``grad_rows`` one number; see
    :func:`kdops.ops.saved_grad.scale_saved_grad`)."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no [N, V] zeros for the unused gradient of output[1]
        ctx.save_for_backward(output[1])
        ctx.compute_grad = args.bind(inputs)["compute_grad"]
        ctx.no_grads = args.no_grads(inputs)

    def backward(ctx, grad_rows: Optional[Tensor], _grad_of_grad: Optional[Tensor]):
        if not ctx.compute_grad:
            raise RuntimeError("kdops: the loss was computed without gradient tracking of the student logits")
        if grad_rows is None:  # only output[1] was used: no gradient to the logits
            return args.grads(ctx.no_grads)
        (row_grad,) = ctx.saved_tensors
        scale = grad_rows if grad_rows.dim() == 0 else grad_rows.unsqueeze(-1)
        return args.grads(ctx.no_grads, **{wrt: scale_saved_grad(row_grad, scale)})

    op.register_autograd(backward, setup_context=setup_context)


def _pack(ctx, named: dict[str, Any]) -> None:
    """Saves the tensors of ``named`` (lists of tensors included) for backward, the rest on ``ctx``."""
    tensors, layout = [], {}
    for name, x in named.items():
        if isinstance(x, Tensor):
            layout[name] = len(tensors)
            tensors.append(x)
        elif isinstance(x, list) and any(isinstance(e, Tensor) for e in x):
            slots = []
            for e in x:
                slots.append(None if e is None else len(tensors))
                if e is not None:
                    tensors.append(e)
            layout[name] = slots
        else:
            layout[name] = ("value", x)
    ctx.save_for_backward(*tensors)
    ctx.layout = layout


def _unpack(ctx) -> dict[str, Any]:
    saved = ctx.saved_tensors
    named = {}
    for name, where in ctx.layout.items():
        if isinstance(where, tuple):
            named[name] = where[1]
        elif isinstance(where, list):
            named[name] = [None if j is None else saved[j] for j in where]
        else:
            named[name] = saved[where]
    return named


def scale_forward_grads(saved: tuple, needs, grad_rows: Tensor) -> list[Optional[Tensor]]:
    """Backward of lm_head rows whose gradients were computed in forward: the rows were only
    summed, so ``grad_rows`` is one value repeated, which scales each saved gradient."""
    scale = grad_rows[:1] if grad_rows.numel() else grad_rows.new_zeros(1)
    return [scale_saved_grad(g, scale) if need else None for g, need in zip(saved, needs)]


def register_lm_head_autograd(op: torch.library.CustomOpDef, args: OpArgs) -> None:
    """Autograd of an lm_head op ``(h, w, b, ..., row_weights, needs, ...) -> (rows, gh, gw, gb)``
    (the gradients of ``sum_r row_weights[r] * rows[r]``, weights 1 if None, where ``needs`` says).
    With ``needs`` set the gradients come from forward and the rows may only be summed: backward
    scales them by the (equal) row weights; else backward runs ``op`` with the row weights."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no zeros of grad_h / grad_w's size for their unused gradients
        named = args.bind(inputs)
        ctx.no_grads = args.no_grads(inputs)
        ctx.needs = named["needs"]
        ctx.in_forward = any(ctx.needs)
        if ctx.in_forward:
            ctx.save_for_backward(*output[1:4])  # grad_h, grad_w, grad_b (not a trailing output: entropies)
        else:
            _pack(ctx, named)

    def backward(ctx, grad_rows: Optional[Tensor], *_unused):
        if grad_rows is None:  # only the other outputs were used: no gradient
            return args.grads(ctx.no_grads)
        if ctx.in_forward:
            grads = scale_forward_grads(ctx.saved_tensors, ctx.needs, grad_rows)
        else:
            inputs = _unpack(ctx)
            needs = list(ctx.needs_input_grad[:3])
            _, *grads = op(**{**inputs, "row_weights": grad_rows.contiguous(), "needs": needs})
            grads = [g if need else None for g, need in zip(grads, needs)]
        return args.grads(ctx.no_grads, h=grads[0], w=grads[1], b=grads[2])

    op.register_autograd(backward, setup_context=setup_context)


# ------------------------------------------------------------------------------- reduction


def check_normalizer(normalizer: Union[None, int, Tensor], reduction: str) -> None:
    """``normalizer``: None, an int > 0 or a one-element tensor (its value is not checked: no sync),
    only with ``reduction="mean"``, whose count of rows it replaces."""
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer replaces the row count of reduction='mean'; got reduction={reduction!r}")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be an int or a one-element tensor; got shape {tuple(normalizer.shape)}")
    elif isinstance(normalizer, bool) or not isinstance(normalizer, int):
        raise TypeError(f"normalizer must be an int or a one-element tensor; got {type(normalizer).__name__}")
    elif normalizer <= 0:
        raise ValueError(f"normalizer must be > 0; got {normalizer}")


def reduction_divisor(labels: Optional[Tensor], ignore_index: int, reduction: str,
                      normalizer: Union[None, int, Tensor], n_rows: int, dtype: torch.dtype,
                      device: torch.device) -> Optional[Tensor]:
    """The 0-dim ``dtype`` tensor on ``device`` that a ``"mean"`` divides the row sum by (formed
    on the device: no sync): ``normalizer`` when given, else the counted rows (labels not
    ``ignore_index``; all ``n_rows`` without labels), at least 1. None for ``"sum"`` / ``"none"``."""
    if reduction != "mean":
        return None
    if isinstance(normalizer, Tensor):
        return normalizer.detach().to(device=device, dtype=dtype).reshape(())
    if normalizer is not None or labels is None:
        return torch.full((), float(max(1, n_rows) if normalizer is None else normalizer), dtype=dtype, device=device)
    return (labels != ignore_index).sum().clamp(min=1).to(dtype)


def reduce_rows(rows: Tensor, labels: Optional[Tensor], ignore_index: int, reduction: str, lead: torch.Size,
                normalizer: Union[None, int, Tensor] = None) -> Tensor:
    """The loss from the row losses ``[N]``: ``"none"`` the rows in the leading shape ``lead``;
    ``"sum"``; ``"mean"`` the sum over the counted rows (labels not ``ignore_index``), or the sum
    divided by ``normalizer`` when given (as Transformers' ``num_items_in_batch``)."""
    valid = None if labels is None else labels != ignore_index
    if valid is None:
        valid = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    return reference.reduce_rows(rows, valid, reduction, normalizer).reshape(lead if reduction == "none" else ())

