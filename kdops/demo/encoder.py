"""Encoder track: a tiny BERT-style encoder (bidirectional self-attention over padded sequences)
trained on masked-token prediction over the stdlib corpus of :mod:`kdops.demo.text`, and a
smaller student (fewer, narrower layers and heads) trained on a small prefix of it:

* ``MLM from scratch``: ``CE(mlm_head(h_s), masked token)`` on the masked positions;
* ``KD``: prediction-layer KD on the masked positions, ``kdops.fused_linear_distill_loss(h_s,
  W_s, h_t, W_t, masked token, temperature=T, hard_weight=a)`` (no ``[tokens, V]`` logits);
* ``KD + attention relations``: ``KD + attention_weight * mean_x relation(x)``, ``x`` in the
  ``q, k, v`` of the last layer of each model, ``relation(x) = kdops.attention_relation_loss(x_s,
  x_s, x_t, x_t, relation_heads=..., causal=False, attention_mask=tokens)`` (MiniLMv2);
* ``KD + attention relations + hints``: that ``+ hint_weight * kdops.hint_loss(h_s, h_t,
  adapter)`` on the final hidden states of the tokens, through a trained ``kdops.nn.Adapter``.

Sequences are windows of ``min_length`` to ``context`` tokens padded to ``context``: padded keys
are outside every attention and relation, padded positions are never masked or counted. Held out
(files neither model saw, fixed windows and masks): masked-token accuracy and perplexity, and the
relation loss to the teacher; mean and std over the student seeds (one teacher).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdops
from kdops.demo import text
from kdops.demo.attention_relation import relation_loss
from kdops.demo.common import generator
from kdops.demo.language_model import parameters, summarize, train

STUDENTS = ("MLM from scratch", "KD", "KD + attention relations", "KD + attention relations + hints")


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 8192
    corpus_tokens: int = 600_000  # training + held-out tokens read from the stdlib
    student_tokens: int = 40_000  # the students' training prefix
    held_out_tokens: int = 32_768  # ~4.5k masked tokens: a binomial spread of 0.5 points of accuracy
    context: int = 32
    min_length: int = 12  # sequences of min_length..context tokens, padded to context
    mask_rate: float = 0.2  # share of the tokens replaced by [MASK] and predicted
    batch_size: int = 16
    head_width: int = 32
    teacher_width: int = 128
    teacher_layers: int = 2
    student_width: int = 64
    student_layers: int = 1
    teacher_steps: int = 1500
    student_steps: int = 200
    eval_every: int = 50
    lr: float = 3e-3
    temperature: float = 1.0
    hard_weight: float = 0.2
    relation_heads: int = 4  # the teacher's 4 heads of 32 and the student's 2 heads of 32
    attention_weight: float = 1.0
    hint_weight: float = 1.0
    task_seed: int = 4321  # the held-out windows and masks


QUICK_ENCODER = EncoderConfig(
    vocab_size=512, corpus_tokens=20_000, student_tokens=4_000, held_out_tokens=1_024, context=16, min_length=6,
    batch_size=8, head_width=8, teacher_width=32, student_width=16, teacher_steps=4, student_steps=4, eval_every=2,
)


class Batch(NamedTuple):
    ids: Tensor  # [B, L] tokens, [MASK] where masked, [PAD] after the sequence
    tokens: Tensor  # [B, L] bool: the sequence's positions (the attention mask)
    masked: Tensor  # [B, L] bool: the masked positions
    targets: Tensor  # [masked.sum()] the masked tokens


class EncoderLayer(nn.Module):
    """Pre-norm BERT-style layer, heads of ``head_width``: ``x + out(attention(q, k, v))``, the
    keys restricted to the tokens, then ``x + ffn(norm(x))``."""

    def __init__(self, width: int, head_width: int) -> None:
        super().__init__()
        self.heads = width // head_width
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, tokens: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The layer's output and its ``(q, k, v)``, each ``[B, L, width]``."""
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in qkv)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens[:, None, None, :])
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.ffn(self.norm2(x)), qkv


class TinyEncoder(nn.Module):
    """Token embeddings (the vocabulary, then ``[PAD]`` and ``[MASK]``) + position embeddings,
    :class:`EncoderLayer` s, a final LayerNorm and an ``mlm_head`` over the vocabulary (no bias)."""

    def __init__(self, vocab: int, width: int, layers: int, head_width: int, context: int) -> None:
        super().__init__()
        self.pad, self.mask = vocab, vocab + 1
        self.embed = nn.Embedding(vocab + 2, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.layers = nn.ModuleList(EncoderLayer(width, head_width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.mlm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor, tokens: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The final hidden states ``[B, L, width]`` and the last layer's ``(q, k, v)``."""
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for layer in self.layers:
            x, qkv = layer(x, tokens)
        return self.norm(x), qkv


def make_batch(stream: Tensor, starts: Tensor, cfg: EncoderConfig, g: torch.Generator, pad: int,
               mask: int) -> Batch:
    """The windows of ``stream`` at ``starts``, cut to random lengths (``min_length`` to
    ``context``), ``mask_rate`` of their tokens masked (at least one a sequence), padded."""
    n, positions = starts.numel(), torch.arange(cfg.context)
    words = stream[starts[:, None] + positions]
    tokens = positions < torch.randint(cfg.min_length, cfg.context + 1, (n, 1), generator=g)
    masked = (torch.rand(n, cfg.context, generator=g) < cfg.mask_rate) & tokens
    masked[:, 0] |= ~masked.any(1)
    ids = torch.where(masked, mask, torch.where(tokens, words, pad))
    return Batch(ids, tokens, masked, words[masked])


class EncoderSetup:
    """The corpus and tokenizer, the held-out batch, and the teacher (trained once, on random
    windows of the whole training stream)."""

    def __init__(self, cfg: EncoderConfig, device: torch.device, backend: Optional[str]) -> None:
        self.cfg, self.device, self.backend = cfg, device, backend
        train_tokens, held_out_tokens = text.corpus(cfg.corpus_tokens)
        tokenizer = text.WordTokenizer(train_tokens, cfg.vocab_size)
        self.vocab_size = len(tokenizer)
        self.stream = tokenizer.encode(train_tokens)
        held_out = tokenizer.encode(held_out_tokens)[: cfg.held_out_tokens]
        starts = torch.arange(0, held_out.numel() - cfg.context + 1, cfg.context)
        self.held_out = self.to_device(make_batch(held_out, starts, cfg, generator(cfg.task_seed),
                                                  self.vocab_size, self.vocab_size + 1))
        self.teacher = self.new_model(cfg.teacher_width, cfg.teacher_layers, cfg.task_seed)
        self.teacher_qkv: tuple[Tensor, ...] = ()
        curve = self.train(self.teacher, cfg.teacher_steps, cfg.task_seed, self.stream,
                           self.cross_entropy(self.teacher), "encoder teacher")
        self.teacher.eval().requires_grad_(False)
        with torch.no_grad():
            self.teacher_qkv = self.teacher(self.held_out.ids, self.held_out.tokens)[1]
        self.teacher_result = {"curve": curve, "parameters": parameters(self.teacher),
                               **self.evaluate(self.teacher)}

    def to_device(self, batch: Batch) -> Batch:
        return Batch(*(t.to(self.device) for t in batch))

    def new_model(self, width: int, layers: int, seed: int) -> TinyEncoder:
        torch.manual_seed(seed)
        return TinyEncoder(self.vocab_size, width, layers, self.cfg.head_width, self.cfg.context).to(self.device)

    def new_student(self, seed: int) -> TinyEncoder:
        """The student architecture, initialised from ``seed`` (the same for every loss)."""
        return self.new_model(self.cfg.student_width, self.cfg.student_layers, seed + 1)

    @torch.no_grad()
    def evaluate(self, model: TinyEncoder) -> dict[str, float]:
        """Held-out masked-token ``perplexity`` and ``accuracy``, and, for a student, the
        ``relation`` loss of its last layer's q, k, v to the teacher's."""
        was_training = model.training
        model.eval()
        b = self.held_out
        h, qkv = model(b.ids, b.tokens)
        logits = model.mlm_head(h[b.masked])
        result = {"perplexity": math.exp(F.cross_entropy(logits, b.targets).item()),
                  "accuracy": (logits.argmax(-1) == b.targets).float().mean().item()}
        if self.teacher_qkv and model is not self.teacher:
            result["relation"] = relation_loss(qkv, self.teacher_qkv, self.cfg.relation_heads, self.backend,
                                               causal=False, attention_mask=b.tokens).item()
        model.train(was_training)
        return result

    def train(self, model: nn.Module, steps: int, seed: int, stream: Tensor, loss_fn: Callable[[Batch], Tensor],
              label: str, evaluated: Optional[TinyEncoder] = None) -> list[tuple[int, float]]:
        """``model`` trained ``steps`` on batches of random windows of ``stream`` (order and masks
        from ``seed``); the held-out perplexity of ``evaluated`` (default ``model``) on the way."""
        cfg = self.cfg

        def batches(g: torch.Generator) -> Batch:
            starts = torch.randint(stream.numel() - cfg.context, (cfg.batch_size,), generator=g)
            return self.to_device(make_batch(stream, starts, cfg, g, self.vocab_size, self.vocab_size + 1))

        target = evaluated if evaluated is not None else model
        return train(model, steps, cfg.lr, cfg.eval_every, seed, batches, loss_fn,
                     lambda: self.evaluate(target)["perplexity"], label)

    @staticmethod
    def cross_entropy(model: TinyEncoder) -> Callable[[Batch], Tensor]:
        return lambda b: F.cross_entropy(model.mlm_head(model(b.ids, b.tokens)[0][b.masked]), b.targets)

    def distill(self, student: TinyEncoder, relations: bool, adapter: Optional[nn.Module]) -> Callable[[Batch], Tensor]:
        """Prediction-layer KD on the masked positions, + the attention relations of the last
        layers (``relations``), + hints of the final hidden states through ``adapter``."""
        cfg, teacher = self.cfg, self.teacher

        def loss(b: Batch) -> Tensor:
            h_s, qkv_s = student(b.ids, b.tokens)
            with torch.no_grad():
                h_t, qkv_t = teacher(b.ids, b.tokens)
            total = kdops.fused_linear_distill_loss(
                h_s[b.masked], student.mlm_head.weight, h_t[b.masked], teacher.mlm_head.weight, b.targets,
                temperature=cfg.temperature, hard_weight=cfg.hard_weight, backend=self.backend)
            if relations:
                total = total + cfg.attention_weight * relation_loss(
                    qkv_s, qkv_t, cfg.relation_heads, self.backend, causal=False, attention_mask=b.tokens)
            if adapter is not None:
                total = total + cfg.hint_weight * kdops.hint_loss(h_s[b.tokens], h_t[b.tokens], adapter=adapter)
            return total
        return loss

    def describe(self) -> dict:
        return {"config": asdict(self.cfg), "vocab_size": self.vocab_size,
                "corpus": {"source": "Python standard library .py sources", "train_tokens": self.stream.numel(),
                           "held_out_sequences": self.held_out.ids.shape[0],
                           "held_out_masked_tokens": self.held_out.targets.numel()},
                "teacher": self.teacher_result}


def run(cfg: EncoderConfig, seeds: list[int], device: torch.device, backend: Optional[str] = None) -> dict:
    """Trains the teacher once, then each student per seed (same initial weights and batches)."""
    setup = EncoderSetup(cfg, device, backend)
    prefix = setup.stream[: cfg.student_tokens]
    per_seed: dict[str, list[dict]] = {name: [] for name in STUDENTS}
    for seed in seeds:
        for name in STUDENTS:
            student = setup.new_student(seed)
            adapter = kdops.nn.Adapter(cfg.student_width, cfg.teacher_width).to(device) if "hints" in name else None
            loss = (setup.cross_entropy(student) if name == "MLM from scratch"
                    else setup.distill(student, "relations" in name, adapter))
            trained = student if adapter is None else nn.ModuleList([student, adapter])
            curve = setup.train(trained, cfg.student_steps, seed + 1, prefix, loss,
                                f"encoder student {name} (seed {seed})", evaluated=student)
            per_seed[name].append({**setup.evaluate(student), "curve": curve})
    untrained = setup.evaluate(setup.new_student(seeds[0]))
    return {"seeds": seeds, "students": summarize(per_seed), "setup": setup.describe(),
            "student_parameters": parameters(setup.new_student(0)),
            "metric": {"key": "accuracy", "name": "held-out masked-token accuracy", "lower_is_better": False},
            "reference": {"untrained student": untrained},
            "settings": {"relations": "q-q, k-k, v-v of the last layer (MiniLMv2), bidirectional, padding mask",
                         "relation_heads": cfg.relation_heads, "attention_weight": cfg.attention_weight,
                         "hint_weight": cfg.hint_weight}}
