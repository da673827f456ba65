"""Language-modelling track: a small causal transformer teacher and a smaller student over a
word-level vocabulary of the stdlib sources (:mod:`kdops.demo.text`).

The teacher is trained on the whole training stream, the student on a small prefix of it, either

* ``from scratch``: ``CE(lm_head(h_s), next token)``, or
* ``distilled``: ``kdops.fused_linear_distill_loss(h_s, W_s, h_t, W_t, next token,
  temperature=T, hard_weight=a)``, the teacher's final hidden states ``h_t`` and ``lm_head``
  weight ``W_t``: the ``[tokens, V]`` logits of neither model are formed.

Both report held-out perplexity ``exp(mean CE)`` on files neither model saw.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdops
from kdops.demo import text
from kdops.demo.common import Progress, generator


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 8192
    corpus_tokens: int = 600_000  # training + held-out tokens read from the stdlib
    student_tokens: int = 40_000  # the student's training prefix
    held_out_tokens: int = 8_192
    context: int = 32
    batch_size: int = 16
    teacher_width: int = 128
    teacher_layers: int = 2
    student_width: int = 64
    student_layers: int = 1
    teacher_steps: int = 400
    student_steps: int = 300
    eval_every: int = 25
    lr: float = 3e-3
    temperature: float = 1.0
    hard_weight: float = 0.2


QUICK_LM = LMConfig(
    vocab_size=512, corpus_tokens=20_000, student_tokens=4_000, held_out_tokens=1_024, context=16,
    batch_size=8, teacher_width=32, student_width=16, teacher_steps=4, student_steps=4, eval_every=2,
)


class TinyLM(nn.Module):
    """Token + position embeddings, pre-norm causal transformer layers, a final LayerNorm and an
    ``lm_head`` without bias; ``forward`` returns the final hidden states ``(B, T, width)``."""

    def __init__(self, vocab: int, width: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, nhead=max(1, width // 32), dim_feedforward=4 * width,
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.layers(self.embed(ids) + self.position[:t], mask=mask, is_causal=True)
        return self.norm(h)


def windows(stream: Tensor, batch: int, context: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of the stream: inputs and next-token targets, ``(batch, context)``."""
    start = torch.randint(stream.numel() - context - 1, (batch, 1), generator=g)
    idx = start + torch.arange(context + 1)
    chunk = stream[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def perplexity(model: TinyLM, stream: Tensor, context: int, device: torch.device) -> float:
    """``exp`` of the mean next-token cross-entropy over consecutive windows of ``stream``."""
    model.eval()
    n = (stream.numel() - 1) // context
    ids = stream[: n * context].view(n, context).to(device)
    targets = stream[1: n * context + 1].view(n, context).to(device)
    total = 0.0
    for rows in range(0, n, 64):
        logits = model.lm_head(model(ids[rows:rows + 64]))
        total += F.cross_entropy(logits.flatten(0, 1), targets[rows:rows + 64].flatten(), reduction="sum").item()
    model.train()
    return math.exp(total / (n * context))


def train(model: TinyLM, stream: Tensor, steps: int, cfg: LMConfig, seed: int,
          loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], held_out: Tensor, device: torch.device,
          label: str) -> list[tuple[int, float]]:
    """AdamW with cosine decay on random windows; ``loss_fn(ids, targets, hidden)``; returns the
    held-out perplexity every ``cfg.eval_every`` steps (and at the end)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = generator(seed)
    curve = []
    bar = Progress(label, steps)
    for step in range(1, steps + 1):
        ids, targets = (t.to(device) for t in windows(stream, cfg.batch_size, cfg.context, g))
        loss = loss_fn(ids, targets, model(ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        info = f"loss {loss.item():.3f}"
        if step % cfg.eval_every == 0 or step == steps:
            curve.append((step, perplexity(model, held_out, cfg.context, device)))
            info += f" held-out ppl {curve[-1][1]:.1f}"
        bar.update(info=info)
    return curve


def run(cfg: LMConfig, seed: int, device: torch.device, backend: Optional[str] = None) -> dict:
    """Tokenizer, teacher, then the student from scratch and distilled (same initial weights)."""
    train_tokens, held_out_tokens = text.corpus(cfg.corpus_tokens)
    tokenizer = text.WordTokenizer(train_tokens, cfg.vocab_size)
    stream = tokenizer.encode(train_tokens)
    held_out = tokenizer.encode(held_out_tokens)[: cfg.held_out_tokens + 1]
    student_stream = stream[: cfg.student_tokens]
    V = len(tokenizer)

    def cross_entropy(model: TinyLM) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        return lambda ids, targets, h: F.cross_entropy(model.lm_head(h).flatten(0, 1), targets.flatten())

    torch.manual_seed(seed)
    teacher = TinyLM(V, cfg.teacher_width, cfg.teacher_layers, cfg.context).to(device)
    teacher_curve = train(teacher, stream, cfg.teacher_steps, cfg, seed, cross_entropy(teacher), held_out,
                          device, "LM teacher")
    teacher.eval().requires_grad_(False)

    def distill(student: TinyLM) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def loss(ids: Tensor, targets: Tensor, h: Tensor) -> Tensor:
            return kdops.fused_linear_distill_loss(
                h, student.lm_head.weight, teacher(ids), teacher.lm_head.weight, targets,
                temperature=cfg.temperature, hard_weight=cfg.hard_weight, backend=backend)
        return loss

    students = {}
    for name, make_loss in (("from scratch", cross_entropy), ("distilled", distill)):
        torch.manual_seed(seed + 1)  # the same initial student for both
        student = TinyLM(V, cfg.student_width, cfg.student_layers, cfg.context).to(device)
        curve = train(student, student_stream, cfg.student_steps, cfg, seed + 1, make_loss(student), held_out,
                      device, f"LM student {name}")
        students[name] = {"perplexity": curve[-1][1], "curve": curve,
                          "parameters": sum(p.numel() for p in student.parameters())}
    return {
        "config": asdict(cfg),
        "seed": seed,
        "vocab_size": V,
        "corpus": {"source": "Python standard library .py sources", "train_tokens": stream.numel(),
                   "student_train_tokens": student_stream.numel(), "held_out_tokens": held_out.numel() - 1,
                   "unknown_rate": float((stream == 0).float().mean())},
        "teacher": {"perplexity": teacher_curve[-1][1], "curve": teacher_curve,
                    "parameters": sum(p.numel() for p in teacher.parameters())},
        "students": students,
        "distillation_beats_baseline": students["distilled"]["perplexity"] < students["from scratch"]["perplexity"],
    }
