"""Distillation into a quantised student: quantisation-aware training (QAT) with the KD loss,
against post-training quantisation (PTQ) of a student trained in float.

Both go through ``torch.ao.quantization.FakeQuantize`` (no extra package): every weight matrix
(``nn.Linear`` and ``nn.Embedding`` weights, attention in-projections) is replaced, through
``torch.nn.utils.parametrize``, by its int8 round trip ``q(w) = s * clamp(round(w / s), -128, 127)``
with a per-output-channel symmetric scale ``s = max|w_row| / 127.5`` observed from the weight;
optionally the inputs of every ``nn.Linear`` called as a module get an 8-bit per-tensor affine
fake-quantiser (uint8, scale and zero point from a moving min/max; attention's projections, which
``nn.MultiheadAttention`` applies through its weights, keep float inputs). The backward pass is the straight-through
estimator (identity inside the clamp range), so in QAT the float weights learn to sit well on
the int8 grid while the loss sees the quantised model. Biases, norms and other parameters stay
float. :func:`freeze` stops the observers: the model then computes exactly with int8 weight
values (times their scales), i.e. simulates the int8 model.

    QAT:  prepare(student) -> train with the KD loss -> freeze(student)
    PTQ:  train in float -> prepare(student) -> calibrate (forward passes) -> freeze(student)
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.ao.quantization as tq
from torch import Tensor, nn
from torch.nn.utils import parametrize

INPUT_QUANTIZER = "input_fake_quant"


class FakeQuantizedWeight(nn.Module):
    """Parametrization ``w -> q(w)``: int8, per output channel (dim 0), symmetric."""

    def __init__(self) -> None:
        super().__init__()
        self.fake_quant = tq.FakeQuantize(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                          quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                          ch_axis=0)

    def forward(self, weight: Tensor) -> Tensor:
        return self.fake_quant(weight)


def _weights(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield module, "weight"
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            yield module, "in_proj_weight"


class InputFakeQuantize(tq.FakeQuantize):
    """8-bit per-tensor affine fake-quantiser of activations whose observer runs in training
    mode only: evaluation uses the ranges seen in training (or calibration), never its own."""

    def __init__(self) -> None:
        super().__init__(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                         qscheme=torch.per_tensor_affine)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        if not self.fake_quant_enabled[0]:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_QUANTIZER)(args[0]), *args[1:])


def _quantize_lm_head_input(model: nn.Module, args: tuple, hidden: Tensor) -> Tensor:
    return getattr(model.lm_head, INPUT_QUANTIZER)(hidden)


def prepare(model: nn.Module, *, activations: bool = False) -> nn.Module:
    """Fake-quantises ``model`` in place (see the module docstring) and returns it; the weights'
    scales follow the weights (observers on) until :func:`freeze`. With ``activations`` each
    ``nn.Linear`` also fake-quantises its input (a forward pre-hook), except a causal LM's
    ``lm_head``, whose input is quantised as the model's output (a forward hook), so losses that
    apply ``lm_head.weight`` themselves (``fused_linear_distill_loss``) see it quantised too."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("model already has parametrizations; prepare() a model only once")
    for module, name in list(_weights(model)):
        parametrize.register_parametrization(module, name, FakeQuantizedWeight())
    if activations:
        lm_head = getattr(model, "lm_head", None)
        for module in list(model.modules()):
            if isinstance(module, nn.Linear):
                module.add_module(INPUT_QUANTIZER, InputFakeQuantize())
                if module is not lm_head:
                    module.register_forward_pre_hook(_quantize_input)
        if isinstance(lm_head, nn.Linear):
            model.register_forward_hook(_quantize_lm_head_input)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Stops every observer of ``model``: scales and zero points stay as observed, so the model
    computes with fixed int8 weights (and 8-bit inputs); returns ``model``."""
    model.apply(tq.disable_observer)
    return model


def quantize_post_training(model: nn.Module, calibrate: Callable[[nn.Module], None], *,
                           activations: bool = False) -> nn.Module:
    """PTQ in place: :func:`prepare`, ``calibrate(model)`` (forward passes over a few batches, run
    in training mode without gradient, which set the scales), then :func:`freeze`; returns ``model``."""
    prepare(model, activations=activations)
    was_training = model.training
    model.train()
    with torch.no_grad():
        calibrate(model)
    model.train(was_training)
    return freeze(model)


def int8_weights(model: nn.Module) -> dict[str, Tensor]:
    """The integer values ``round(q(w) / s)`` of every fake-quantised weight (int8), by name;
    call it after :func:`freeze` (reading a weight runs its observer while it is on)."""
    out = {}
    for name, module in model.named_modules():
        for param, plist in getattr(module, "parametrizations", {}).items():
            fq = plist[0].fake_quant
            with torch.no_grad():
                w = getattr(module, param)
                scale = fq.scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
                out[f"{name}.{param}" if name else param] = torch.round(w / scale).to(torch.int8)
    return out
