"""Distilling a Hugging Face causal LM with kdops inside ``transformers.Trainer``.

:class:`kdops.integrations.transformers.DistillationTrainer` runs the student's and the teacher's
base models (no ``lm_head``), then ``kdops.fused_linear_distill_loss`` on their final hidden
states and ``lm_head`` weights: the ``[tokens, V]`` logits of neither model are ever formed.
Per token::

    loss = a * CE(student, next token) + (1 - a) * T**2 * KL(softmax(t / T) || softmax(s / T))

The models here are tiny, randomly initialised Llamas built from configs (no download); with
real checkpoints only ``build_models`` changes. Needs ``pip install transformers accelerate``.

Run: ``python examples/hf_distillation_trainer.py`` (a few steps on CPU or GPU).
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from kdops.integrations.transformers import DistillationTrainer


def build_models(vocab_size: int = 512, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A tiny teacher (2 layers, width 64) and a tinier student (1 layer, width 32), randomly
    initialised; they share the vocabulary, not the hidden size."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, max_position_embeddings=64, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **common))
    student = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, **common))
    return teacher, student


class RandomTokens(torch.utils.data.Dataset):
    """``n`` fixed random sequences; the last ``pad`` positions of each are padding."""

    def __init__(self, n: int, length: int, vocab_size: int, pad: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(vocab_size, (n, length), generator=g)
        self.attention_mask = torch.ones(n, length, dtype=torch.long)
        self.attention_mask[:, length - pad:] = 0
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def make_trainer(output_dir: str, steps: int = 8, temperature: float = 2.0, hard_weight: float = 0.5,
                 **trainer_options: Any) -> DistillationTrainer:
    """A :class:`DistillationTrainer` of the tiny models for ``steps`` optimizer steps."""
    teacher, student = build_models()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    return DistillationTrainer(model=student, args=args, train_dataset=RandomTokens(32, 24, 512), teacher=teacher,
                               temperature=temperature, hard_weight=hard_weight, **trainer_options)


def logged_losses(trainer: Trainer) -> list[float]:
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, steps=20)
        trainer.train()
    for step, loss in enumerate(logged_losses(trainer), 1):
        print(f"step {step:>3}  loss {loss:.4f}")
