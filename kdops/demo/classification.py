"""Classification track: a wide teacher MLP and a narrow student MLP on a synthetic task.

Task: inputs ``x ~ N(0, I_d)``; the true class is the argmax of a fixed random two-layer tanh
network's outputs (a non-linear, non-separable labelling). Training labels are corrupted by
symmetric label noise (a fraction of them replaced by a uniformly random class); held-out labels
are clean. The teacher sees many noisy examples (the noise averages out), each student a few
(hard labels alone overfit the noise). Students, all the same architecture and data:

* ``hard labels``:  ``CE(student(x), y)``
* ``KD``:           ``kdops.distill_loss(student(x), teacher(x), y, temperature=T, hard_weight=a)``
* ``KD + SP``:      the above plus ``gamma * kdops.similarity_preserving_loss(h_s, h_t)`` on the
  penultimate features (different widths: SP compares the batch's ``[B, B]`` similarities).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdops
from kdops.demo.common import Progress, generator, mean_std

STUDENTS = ("hard labels", "KD", "KD + SP")


@dataclass(frozen=True)
class ClassificationConfig:
    features: int = 24
    classes: int = 10
    label_noise: float = 0.4  # fraction of training labels replaced by a random class
    teacher_examples: int = 40000
    student_examples: int = 2000
    test_examples: int = 10000
    teacher_width: int = 512
    student_width: int = 32
    teacher_epochs: int = 12
    student_epochs: int = 60
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 4.0
    hard_weight: float = 0.1
    sp_weight: float = 1000.0  # gamma of the SP term
    task_seed: int = 1234


QUICK_CLASSIFICATION = ClassificationConfig(
    teacher_examples=2000, student_examples=256, test_examples=512, teacher_width=64,
    teacher_epochs=2, student_epochs=2,
)


class MLP(nn.Module):
    """``x -> ReLU(W1 x) -> ReLU(W2 .) = h -> W3 h``; ``forward`` returns (logits, h)."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.head(h), h


def make_data(cfg: ClassificationConfig, n: int, seed: int, noisy: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """``n`` examples of the task (fixed by ``cfg.task_seed``); labels noisy if ``noisy``."""
    task = generator(cfg.task_seed)
    w1 = torch.randn(cfg.features, 64, generator=task)
    w2 = torch.randn(64, cfg.classes, generator=task)
    g = generator(seed)
    x = torch.randn(n, cfg.features, generator=g)
    y = (torch.tanh(x @ w1 / cfg.features**0.5) @ w2).argmax(1)
    if noisy:
        flip = torch.rand(n, generator=g) < cfg.label_noise
        y = torch.where(flip, torch.randint(cfg.classes, (n,), generator=g), y)
    return x.to(device), y.to(device)


@torch.no_grad()
def accuracy(model: MLP, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = (model(x)[0].argmax(1) == y).float().mean().item()
    model.train()
    return correct


def train(model: MLP, x: Tensor, y: Tensor, epochs: int, cfg: ClassificationConfig, seed: int,
          loss_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], evaluate: Callable[[], float],
          label: str) -> list[float]:
    """Adam over shuffled mini-batches; ``loss_fn(x, y, logits, h)``; held-out accuracy per epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = generator(seed)
    curve = []
    bar = Progress(label, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(cfg.batch_size):
            idx = idx.to(x.device)
            logits, h = model(x[idx])
            loss = loss_fn(x[idx], y[idx], logits, h)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append(evaluate())
        bar.update(info=f"test acc {curve[-1]:.3f}")
    return curve


def run(cfg: ClassificationConfig, seeds: list[int], device: torch.device,
        backend: Optional[str] = None) -> dict:
    """Trains the teacher once, then each student per seed; returns accuracies and curves."""
    x_test, y_test = make_data(cfg, cfg.test_examples, cfg.task_seed + 1, noisy=False, device=device)
    x_teach, y_teach = make_data(cfg, cfg.teacher_examples, cfg.task_seed + 2, noisy=True, device=device)
    torch.manual_seed(cfg.task_seed)
    teacher = MLP(cfg.features, cfg.teacher_width, cfg.classes).to(device)
    teacher_curve = train(teacher, x_teach, y_teach, cfg.teacher_epochs, cfg, cfg.task_seed,
                          lambda x, y, logits, h: F.cross_entropy(logits, y),
                          lambda: accuracy(teacher, x_test, y_test), "teacher")
    teacher.eval().requires_grad_(False)

    def kd(x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        return kdops.distill_loss(logits, teacher(x)[0], y, temperature=cfg.temperature,
                                  hard_weight=cfg.hard_weight, backend=backend)

    losses = {
        "hard labels": lambda x, y, logits, h: F.cross_entropy(logits, y),
        "KD": lambda x, y, logits, h: kd(x, y, logits),
        "KD + SP": lambda x, y, logits, h: kd(x, y, logits)
        + cfg.sp_weight * kdops.similarity_preserving_loss(h, teacher(x)[1], backend=backend),
    }
    final: dict[str, list[float]] = {name: [] for name in STUDENTS}
    curves: dict[str, list[list[float]]] = {name: [] for name in STUDENTS}
    for seed in seeds:
        x, y = make_data(cfg, cfg.student_examples, 10_000 + seed, noisy=True, device=device)
        for name in STUDENTS:
            torch.manual_seed(seed)  # the same initial student for every loss
            student = MLP(cfg.features, cfg.student_width, cfg.classes).to(device)
            curve = train(student, x, y, cfg.student_epochs, cfg, seed, losses[name],
                          lambda: accuracy(student, x_test, y_test), f"student {name} (seed {seed})")
            curves[name].append(curve)
            final[name].append(curve[-1])
    students = {}
    for name in STUDENTS:
        mean, std = mean_std(final[name])
        students[name] = {"accuracy": final[name], "mean": mean, "std": std,
                          "curve_mean": [mean_std(c)[0] for c in zip(*curves[name])]}
    baseline = students["hard labels"]["mean"]
    return {
        "config": asdict(cfg),
        "seeds": seeds,
        "teacher": {"accuracy": teacher_curve[-1], "curve": teacher_curve,
                    "parameters": sum(p.numel() for p in teacher.parameters())},
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "students": students,
        "distillation_beats_baseline": {name: students[name]["mean"] > baseline for name in STUDENTS[1:]},
    }
