"""Language-modelling track: a small causal transformer teacher and a smaller student over a
word-level vocabulary of the stdlib sources (:mod:`kdops.demo.text`).

The teacher is trained on the whole training stream, the student on a small prefix of it, either

* ``from scratch``: ``CE(lm_head(h_s), next token)``, or
* ``distilled``: ``kdops.fused_linear_distill_loss(h_s, W_s, h_t, W_t, next token,
  temperature=T, hard_weight=a)``, the teacher's final hidden states ``h_t`` and ``lm_head``
  weight ``W_t``: the ``[tokens, V]`` logits of neither model are formed.

Both report held-out perplexity ``exp(mean CE)`` on files neither model saw, mean and std over
the student seeds (the teacher is trained once). :class:`LMSetup` holds what this track shares with
the recipe tracks of :mod:`kdops.demo.recipe_tracks`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdops import recipes
from kdops.demo import text
from kdops.demo.common import Progress, generator, mean_std


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
    student_steps: int = 200
    eval_every: int = 50
    lr: float = 3e-3
    temperature: float = 1.0
    hard_weight: float = 0.2
    # generations (on-policy, sequence-level, preference): prompt + continuation = context
    prompt_len: int = 16
    eval_prompts: int = 128  # held-out prompts the students' generations are scored on
    # on-policy (GKD, after supervised KD for on_policy_start of the steps): share of on-policy
    # batches, divergence on them
    on_policy_start: float = 0.5
    on_policy_fraction: float = 0.5
    on_policy_divergence: str = "reverse_kl"
    # sequence-level: teacher continuations of student-data prompts, sampled at T = 1
    corpus_sequences: int = 2_000
    sequence_hard_weight: float = 0.5  # of CE in "CE + KD"
    # quantized: int8 weights (and 8-bit inputs of the linear layers)
    quantize_activations: bool = True
    # preference: reward 1 on the preferred tokens (numbers), tilt exp(1 / beta)
    preference_beta: float = 0.5
    preference_steps: int = 100
    # sampled-cache: the top-k cache's k (the sampled cache gets the same bytes per token)
    cache_topk: int = 8
    # attention-relation: MiniLMv2 relations of the last layers in this many heads, their weight
    attention_relation_heads: int = 4
    attention_weight: float = 1.0


QUICK_LM = LMConfig(
    vocab_size=512, corpus_tokens=20_000, student_tokens=4_000, held_out_tokens=1_024, context=16,
    batch_size=8, teacher_width=32, student_width=16, teacher_steps=4, student_steps=4, eval_every=2,
    prompt_len=8, eval_prompts=8, corpus_sequences=32, preference_steps=2,
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


def windows(stream: Tensor, batch: int, length: int, g: torch.Generator) -> Tensor:
    """``batch`` random windows of ``length`` consecutive tokens of the stream, ``(batch, length)``."""
    start = torch.randint(stream.numel() - length, (batch, 1), generator=g)
    return stream[start + torch.arange(length)]


@torch.no_grad()
def perplexity(model: TinyLM, stream: Tensor, context: int, device: torch.device) -> float:
    """``exp`` of the mean next-token cross-entropy over consecutive windows of ``stream``."""
    was_training = model.training
    model.eval()
    n = (stream.numel() - 1) // context
    ids = stream[: n * context].view(n, context).to(device)
    targets = stream[1: n * context + 1].view(n, context).to(device)
    total = 0.0
    for rows in range(0, n, 64):
        logits = model.lm_head(model(ids[rows:rows + 64]))
        total += F.cross_entropy(logits.flatten(0, 1), targets[rows:rows + 64].flatten(), reduction="sum").item()
    model.train(was_training)
    return math.exp(total / (n * context))


def train(model: nn.Module, steps: int, lr: float, eval_every: int, seed: int,
          batches: Callable[[torch.Generator], Any], loss_fn: Callable[[Any], Tensor],
          evaluate: Callable[[], float], label: str) -> list[tuple[int, float]]:
    """AdamW with cosine decay on ``model``'s parameters; each step ``loss_fn(batches(g))`` (a
    batch of ``(B, context + 1)`` sequences, or what ``loss_fn`` takes); returns ``evaluate()``
    (the held-out perplexity) every ``eval_every`` steps (and at the end)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = generator(seed)
    curve = []
    bar = Progress(label, steps)
    for step in range(1, steps + 1):
        loss = loss_fn(batches(g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        info = f"loss {loss.item():.3f}"
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate()))
            info += f" held-out ppl {curve[-1][1]:.1f}"
        bar.update(info=info)
    return curve


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class LMSetup:
    """What the LM tracks share: the corpus and tokenizer, the teacher (trained once, on the whole
    training stream, seed ``teacher_seed``), held-out prompts, and the two baseline students per
    seed (``from scratch``: CE on the student's data; ``distilled``: ``fused_linear_distill_loss``
    on it, T and hard_weight of the config), trained when a track first asks for them."""

    BASELINES = ("from scratch", "distilled")

    def __init__(self, cfg: LMConfig, teacher_seed: int, device: torch.device, backend: Optional[str]) -> None:
        self.cfg, self.device, self.backend = cfg, device, backend
        train_tokens, held_out_tokens = text.corpus(cfg.corpus_tokens)
        self.tokenizer = text.WordTokenizer(train_tokens, cfg.vocab_size)
        self.stream = self.tokenizer.encode(train_tokens)
        self.held_out = self.tokenizer.encode(held_out_tokens)[: cfg.held_out_tokens + 1]
        self.student_stream = self.stream[: cfg.student_tokens]
        # the student's data: its prefix cut into windows of context + 1 tokens (overlapping by one)
        n = (self.student_stream.numel() - 1) // cfg.context
        self.student_windows = self.student_stream[torch.arange(n)[:, None] * cfg.context
                                                   + torch.arange(cfg.context + 1)].to(device)
        self.vocab_size = len(self.tokenizer)
        starts = torch.linspace(0, self.held_out.numel() - cfg.context - 1, cfg.eval_prompts).long()
        self.eval_prompts = self.held_out[starts[:, None] + torch.arange(cfg.prompt_len)].to(device)
        torch.manual_seed(teacher_seed)
        self.teacher = TinyLM(self.vocab_size, cfg.teacher_width, cfg.teacher_layers, cfg.context).to(device)
        curve = self.train(self.teacher, cfg.teacher_steps, teacher_seed, self.data(self.stream),
                           self.cross_entropy(self.teacher), "LM teacher")
        self.teacher.eval().requires_grad_(False)
        self.teacher_result = {"perplexity": curve[-1][1], "curve": curve, "parameters": parameters(self.teacher)}
        self._baselines: dict[tuple[str, int], tuple[TinyLM, list[tuple[int, float]]]] = {}

    def data(self, stream: Tensor) -> Callable[[torch.Generator], Tensor]:
        """Batches of random windows of ``stream`` (the teacher's data)."""
        return lambda g: windows(stream, self.cfg.batch_size, self.cfg.context + 1, g).to(self.device)

    def rows(self, sequences: Tensor) -> Callable[[torch.Generator], Tensor]:
        """Batches of random rows of ``sequences`` (the students' data: windows, or a corpus)."""
        return lambda g: sequences[torch.randint(sequences.shape[0], (self.cfg.batch_size,), generator=g)]

    @staticmethod
    def cross_entropy(model: TinyLM) -> Callable[[Tensor], Tensor]:
        return lambda seq: recipes.generation.continuation_nll(model, seq, 1)

    def distill(self, student: TinyLM, teacher: Optional[TinyLM] = None) -> Callable[[Tensor], Tensor]:
        """Token-level KD on data sequences (the ``distilled`` baseline's loss)."""
        return lambda seq: recipes.generation.continuation_distill_loss(
            student, teacher or self.teacher, seq, 1, temperature=self.cfg.temperature,
            hard_weight=self.cfg.hard_weight, backend=self.backend)

    def train(self, model: TinyLM, steps: int, seed: int, batches: Callable[[torch.Generator], Tensor],
              loss_fn: Callable[[Tensor], Tensor], label: str) -> list[tuple[int, float]]:
        return train(model, steps, self.cfg.lr, self.cfg.eval_every, seed, batches, loss_fn,
                     lambda: perplexity(model, self.held_out, self.cfg.context, self.device), label)

    def new_student(self, seed: int) -> TinyLM:
        """The student architecture, initialised from ``seed`` (the same for every recipe)."""
        torch.manual_seed(seed + 1)
        cfg = self.cfg
        return TinyLM(self.vocab_size, cfg.student_width, cfg.student_layers, cfg.context).to(self.device)

    def train_student(self, seed: int, make_loss: Callable[[TinyLM], Callable[[Tensor], Tensor]], label: str,
                      batches: Optional[Callable[[torch.Generator], Tensor]] = None,
                      student: Optional[TinyLM] = None) -> tuple[TinyLM, list[tuple[int, float]]]:
        """A new student (or ``student``) trained ``student_steps`` on ``batches`` (default: the
        student's windows, order from ``seed``) with ``make_loss(student)``."""
        student = student if student is not None else self.new_student(seed)
        curve = self.train(student, self.cfg.student_steps, seed + 1, batches or self.rows(self.student_windows),
                           make_loss(student), f"{label} (seed {seed})")
        return student, curve

    def baseline(self, name: str, seed: int) -> tuple[TinyLM, list[tuple[int, float]]]:
        """The ``from scratch`` or ``distilled`` student of ``seed`` and its curve (trained once)."""
        if (name, seed) not in self._baselines:
            make_loss = self.cross_entropy if name == "from scratch" else self.distill
            self._baselines[name, seed] = self.train_student(seed, make_loss, f"LM student {name}")
        return self._baselines[name, seed]

    def generations(self, model: TinyLM, seed: int) -> Tensor:
        """``model``'s continuations (T = 1) of the held-out prompts, sampled with ``seed``."""
        return recipes.generation.sample(model, self.eval_prompts, self.cfg.context + 1 - self.cfg.prompt_len,
                                         generator=generator(10_000 + seed, self.device))

    def describe(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "vocab_size": self.vocab_size,
            "corpus": {"source": "Python standard library .py sources", "train_tokens": self.stream.numel(),
                       "student_train_tokens": self.student_stream.numel(),
                       "held_out_tokens": self.held_out.numel() - 1,
                       "unknown_rate": float((self.stream == 0).float().mean())},
            "teacher": self.teacher_result,
            "student_parameters": parameters(self.new_student(0)),
        }


def summarize(per_seed: dict[str, list[dict]]) -> dict:
    """Per student: each metric's values over seeds with mean and std; the mean learning curve."""
    students = {}
    for name, runs in per_seed.items():
        entry: dict = {}
        for key in runs[0]:
            if key == "curve":
                if runs[0]["curve"]:
                    steps = [step for step, _ in runs[0]["curve"]]
                    entry["curve"] = [(step, mean_std(vals)[0]) for step, vals in
                                      zip(steps, zip(*[[p for _, p in r["curve"]] for r in runs]))]
            else:
                values = [r[key] for r in runs]
                mean, std = mean_std(values)
                entry[key] = {"values": values, "mean": mean, "std": std}
        students[name] = entry
    return students


def run(setup: LMSetup, seeds: list[int]) -> dict:
    """The language-model track: the student from scratch vs distilled (same initial weights)."""
    per_seed: dict[str, list[dict]] = {name: [] for name in LMSetup.BASELINES}
    for seed in seeds:
        for name in LMSetup.BASELINES:
            _, curve = setup.baseline(name, seed)
            per_seed[name].append({"perplexity": curve[-1][1], "curve": curve})
    return {"seeds": seeds, "students": summarize(per_seed), "metric": None}
