"""Swapping kdops into a plain PyTorch distillation loop.

The usual loss (Hinton et al.): ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T),
log_target=True, reduction="batchmean") * T**2`` becomes ``kdops.distill_loss(s, t,
temperature=T)``, the same number and gradient from one fused kernel. With labels and
``hard_weight=a`` it also folds in ``a * CE(s, y)`` (and scales the KD term by ``1 - a``).

Run: ``python examples/plain_training_loop.py`` (prints both loops' losses side by side).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdops

TEMPERATURE = 2.0


def torch_kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The loss most training loops write by hand."""
    T = TEMPERATURE
    return F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                    log_target=True, reduction="batchmean") * T**2


def kdops_kd_loss(student_logits: Tensor, teacher_logits: Tensor, backend: Optional[str] = None) -> Tensor:
    """Its drop-in replacement."""
    return kdops.distill_loss(student_logits, teacher_logits, temperature=TEMPERATURE, backend=backend)


def train(loss_fn: Callable[[Tensor, Tensor], Tensor], steps: int = 20, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> list[float]:
    """Distils a small MLP from a fixed random teacher with SGD; returns the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype).requires_grad_(False)
    student = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    opt = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(48, 16, generator=g, dtype=dtype)
        loss = loss_fn(student(x), teacher(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    reference, fused = train(torch_kd_loss), train(kdops_kd_loss)
    print(f"{'step':>4}  {'F.kl_div':>10}  {'kdops':>10}")
    for step, (a, b) in enumerate(zip(reference, fused)):
        print(f"{step:>4}  {a:>10.6f}  {b:>10.6f}")
