"""Offline distillation of a causal LM inside ``transformers.Trainer``.

:class:`DistillationTrainer` (or :class:`DistillationMixin` before another ``Trainer`` subclass)
computes its loss from the student's and the teacher's final hidden states and ``lm_head``
weights with :func:`kdops.fused_linear_distill_loss` (teacher model) or
:func:`kdops.fused_linear_sparse_distill_loss` (a :class:`kdops.cache.TeacherCache` of the
teacher's top-k): the ``[B, S, V]`` logits of neither model are formed. Per position ``t`` (which
predicts token ``t + 1``; positions whose next label is -100 do not count)::

    row = a * CE(student, label[t + 1]) + (1 - a) * c * D(softmax(t' / T), softmax(s' / T))

with ``a = hard_weight``, ``c = T**2`` (``scale_by_temperature_squared``), ``s'``, ``t'`` the
models' logits after their configs' logit scale and final-logit softcapping. The loss is the sum
of the rows divided by Transformers' ``num_items_in_batch`` (gradient-accumulation-correct,
across devices as ``average_tokens_across_devices`` says), else by the number of counted rows.
The whole loss runs as the wrapped model's forward (DDP / FSDP2 hooks fire); under bf16
autocast the matmuls run in bf16, the loss in float32; gradient checkpointing works as usual.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer

from kdops.cache import TeacherCache
from kdops.integrations._common import autocast_dtype, full_lm_head, fused_lm_head_loss
from kdops.ops.sparse_kd import fused_linear_sparse_distill_loss

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def logit_transform(model: PreTrainedModel) -> tuple[float, Optional[float]]:
    """``(scale, softcap)`` of a model's final logits, from its (text) config: ``logit_scale``
    (Cohere), ``lm_head_multiplier`` (Falcon-H1), ``1 / logits_scaling`` (Granite, MiniCPM3), and
    ``final_logit_softcapping`` (Gemma 2/3); ``(1.0, None)`` when it has none."""
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def run_as_forward(wrapped: nn.Module, module: nn.Module, fn: Callable[[], Tensor]) -> Tensor:
    """``fn()`` run as the forward of ``wrapped`` (``module`` or its DDP / FSDP wrapper), so the
    wrapper's hooks see a forward: DDP prepares its gradient reduction, FSDP2 gathers the
    parameters ``fn`` reads (the ``lm_head`` among them)."""
    original = module.forward

    def forward(*_args: Any, **_kwargs: Any) -> Tensor:
        module.forward = original
        return fn()

    module.forward = forward
    try:
        return wrapped()
    finally:
        module.forward = original


class DistillationMixin:
    """``Trainer`` mixin: ``compute_loss`` distils ``teacher`` (a causal LM sharing the student's
    vocabulary; any hidden size) or ``teacher_cache`` (a :class:`kdops.cache.TeacherCache` of
    the same sequences: batches then carry ``example_ids`` and the cache's temperature is used;
    set ``remove_unused_columns=False`` for ``datasets.Dataset`` inputs) into the trained model.
    Options as in :func:`kdops.fused_linear_distill_loss` (``rest_mass`` for the cache, as in
    :func:`kdops.fused_linear_sparse_distill_loss`)."""

    def __init__(self, *args: Any, teacher: Optional[PreTrainedModel] = None,
                 teacher_cache: Optional[TeacherCache] = None, temperature: float = 1.0,
                 divergence: str = "forward_kl", beta: float = 0.5, hard_weight: float = 0.0,
                 scale_by_temperature_squared: bool = True, rest_mass: str = "bucket",
                 chunk_size: Optional[int] = None, backend: Optional[str] = None, **kwargs: Any) -> None:
        if (teacher is None) == (teacher_cache is None):
            raise ValueError("DistillationTrainer needs exactly one of teacher= (a model) and teacher_cache=")
        super().__init__(*args, **kwargs)
        self.teacher = None if teacher is None else teacher.to(self.args.device).eval().requires_grad_(False)
        self.teacher_cache = teacher_cache
        if teacher_cache is not None:
            temperature = teacher_cache.temperature
        self.distill_options = dict(divergence=divergence, beta=beta, hard_weight=hard_weight, temperature=temperature,
                                    scale_by_temperature_squared=scale_by_temperature_squared, chunk_size=chunk_size,
                                    ignore_index=IGNORE_INDEX, backend=backend)
        self.rest_mass = rest_mass

    def distillation_loss(self, student: PreTrainedModel, inputs: dict[str, Tensor],
                          num_items_in_batch: Optional[Tensor]) -> Tensor:
        """The loss of one batch (see the module docstring); runs inside the student's forward."""
        features = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        hidden = student.base_model(**features, use_cache=False).last_hidden_state[:, :-1]
        labels = self._shifted_labels(inputs)
        head = student.get_output_embeddings()
        scale, softcap = logit_transform(student)
        options = dict(self.distill_options, normalizer=num_items_in_batch, student_logit_scale=scale,
                       student_softcap=softcap)
        if self.teacher_cache is not None:
            dtype = autocast_dtype(hidden)
            weight, bias = full_lm_head(head.weight, head.bias, dtype)
            logprobs, indices = self._cached_targets(inputs, hidden.shape[1] + 1)
            with torch.autocast(hidden.device.type, enabled=False):
                return fused_linear_sparse_distill_loss(hidden.to(dtype), weight, logprobs, indices, labels,
                                                        student_bias=bias, rest_mass=self.rest_mass, **options)
        with torch.no_grad():
            teacher_hidden = self.teacher.base_model(**features, use_cache=False).last_hidden_state[:, :-1]
        t_head = self.teacher.get_output_embeddings()
        t_scale, t_softcap = logit_transform(self.teacher)
        return fused_lm_head_loss(hidden, head.weight, head.bias, teacher_hidden, t_head.weight, t_head.bias, labels,
                                  teacher_logit_scale=t_scale, teacher_softcap=t_softcap, **options)

    @staticmethod
    def _shifted_labels(inputs: dict[str, Tensor]) -> Tensor:
        """Labels of the predicting positions ``0 .. S-2``: ``labels[:, 1:]``, else the next
        tokens where the attention mask is set (-100 elsewhere)."""
        if "labels" in inputs:
            return inputs["labels"][:, 1:]
        tokens = inputs["input_ids"][:, 1:]
        if "attention_mask" not in inputs:
            return tokens
        return tokens.masked_fill(inputs["attention_mask"][:, 1:] == 0, IGNORE_INDEX)

    def _cached_targets(self, inputs: dict[str, Tensor], length: int) -> tuple[Tensor, Tensor]:
        """The cache's top-k ``[B, length - 1, k]`` log-probabilities and indices of the batch's
        ``example_ids`` at the predicting positions; every example must hold ``length`` tokens."""
        if "example_ids" not in inputs:
            raise ValueError("teacher_cache needs batches with 'example_ids' (and remove_unused_columns=False)")
        ids = inputs["example_ids"].reshape(-1).tolist()
        soft = self.teacher_cache.read(ids)
        if not bool((soft.lengths == length).all()):
            raise ValueError(f"teacher_cache examples must hold the batch's {length} tokens each; "
                             f"got lengths {soft.lengths.tolist()} for example_ids {ids}")
        device = inputs["input_ids"].device
        shape = (len(ids), length, soft.logprobs.shape[-1])
        return (soft.logprobs.reshape(shape)[:, :-1].to(device), soft.indices.reshape(shape)[:, :-1].to(device))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Optional[Tensor] = None):
        student = self.accelerator.unwrap_model(model)
        loss = run_as_forward(model, student, lambda: self.distillation_loss(student, inputs, num_items_in_batch))
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the token count is global, and DDP / FSDP average the ranks' gradients
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


class DistillationTrainer(DistillationMixin, Trainer):
    """``transformers.Trainer`` distilling ``teacher`` or ``teacher_cache`` with kdops (see
    :class:`DistillationMixin`)."""
