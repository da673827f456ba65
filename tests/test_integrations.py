"""kdops in the training loops users already have: a plain PyTorch loop (examples/plain_training_loop.py),
``torch.compile`` of a whole step, TRL's trainers' losses patched by kdops.integrations.trl (against the
stock ones on tiny random models), kdops.integrations.transformers' Trainer (against the reference on the
models' own logits; gradient accumulation, checkpointing, bf16, a teacher cache) and DTensor lm_head weights
on two gloo ranks. No downloads: every model is built from a config."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kdops

from conftest import assert_close_to_max, spawn_ranks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"kdops_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_plain_loop_trains_like_f_kl_div(backend):
    """Swapping ``F.kl_div(...) * T^2`` for ``kdops.distill_loss``: the same losses step by step."""
    loop = load_example("plain_training_loop")
    reference = loop.train(loop.torch_kd_loss, steps=20)
    fused = loop.train(lambda s, t: loop.kdops_kd_loss(s, t, backend=backend), steps=20)
    assert reference[-1] < 0.5 * reference[0]  # it does train
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=1e-4, atol=1e-6)


def test_plain_loop_float64_exact():
    loop = load_example("plain_training_loop")
    reference = loop.train(loop.torch_kd_loss, steps=5, dtype=torch.float64)
    fused = loop.train(lambda s, t: loop.kdops_kd_loss(s, t, backend="cpu"), steps=5, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=1e-10, atol=1e-12)


def test_hf_distillation_trainer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = load_example("hf_distillation_trainer")
    trainer = hf.make_trainer(str(tmp_path), steps=3, temperature=2.0, hard_weight=0.5)
    student, teacher = trainer.model, trainer.teacher

    # compute_loss = the reference on materialised logits (shifted, padding ignored)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = kdops.reference.distill_loss(s, t, batch["labels"][:, 1:], temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(loss.detach(), expected, rtol=2e-5, atol=1e-6)

    teacher_before = [p.clone() for p in teacher.parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    losses = hf.logged_losses(trainer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(student_before, student.parameters()))


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU())
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


def _training_run(compile_step: bool, backend: str, steps: int = 3):
    """Losses and final weights of ``steps`` SGD steps of a student distilled with KD + SP + hint
    from a fixed teacher, the whole step (forward, kdops losses, backward, optimizer step) compiled
    or eager."""
    torch.manual_seed(0)
    teacher = nn.Linear(12, 7).requires_grad_(False)
    teacher_features = nn.Linear(12, 16).requires_grad_(False)
    student = Student()
    adapter = nn.Linear(24, 16)
    params = list(student.parameters()) + list(adapter.parameters())
    opt = torch.optim.SGD(params, lr=0.1)

    def step(x, y):
        logits, h = student(x)
        f_t = teacher_features(x)
        loss = (kdops.distill_loss(logits, teacher(x), y, temperature=2.0, hard_weight=0.3, backend=backend)
                + kdops.similarity_preserving_loss(h, f_t, backend=backend)
                + kdops.hint_loss(h, f_t, adapter=adapter))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    run = torch.compile(step, backend="aot_eager") if compile_step else step
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(9, 12, generator=g)
        losses.append(run(x, torch.randint(7, (9,), generator=g)))
    return torch.stack(losses), [p.detach() for p in params]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_whole_training_step(backend):
    torch._dynamo.reset()
    eager_losses, eager_params = _training_run(False, backend)
    compiled_losses, compiled_params = _training_run(True, backend)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_forward_and_loss():
    """Forward and kdops losses in one graph (no break), inductor; backward through it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    student, teacher = Student(), nn.Linear(12, 7).requires_grad_(False)
    x, y = torch.randn(9, 12), torch.randint(7, (9,))

    def forward_loss(x, y):
        logits, h = student(x)
        return kdops.distill_loss(logits, teacher(x), y, temperature=2.0, hard_weight=0.3) + \
            kdops.rkd_distance_loss(h, teacher(x))

    eager = forward_loss(x, y)
    eager_grads = torch.autograd.grad(eager, list(student.parameters()))
    compiled = torch.compile(forward_loss, fullgraph=True)(x, y)
    compiled_grads = torch.autograd.grad(compiled, list(student.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ TRL: kdops.integrations.trl

def _tiny_causal_lms(family: str, vocab: int = 211, softcap: float = 3.0, seed=None):
    """A randomly initialised teacher (width 48) and student (width 32) of ``family`` sharing a
    vocabulary (initialised from ``seed`` if given); ``lm_head`` weights scaled up so that the
    logits reach the softcap's range."""
    transformers = pytest.importorskip("transformers")
    if seed is not None:
        torch.manual_seed(seed)
    common = dict(vocab_size=vocab, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    extra = {"Gemma2": dict(final_logit_softcapping=softcap, head_dim=8, query_pre_attn_scalar=8),
             "Cohere": dict(logit_scale=0.5), "Granite": dict(logits_scaling=4.0)}.get(family, {})
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    models = []
    for width in (48, 32):
        model = model_cls(config_cls(hidden_size=width, **common, **extra))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
        models.append(model)
    return models


class _TRLLossPath:
    """TRL's own ``DistillationTrainer._compute_loss`` (hidden states of both models, logit scale
    and softcapping read from their configs, then the module-level ``_chunked_divergence_loss``)
    on a stand-in for the trainer: no tokenizer, dataset, generation or download."""

    def __init__(self, student, teacher, beta: float, temperature: float):
        import inspect
        from types import SimpleNamespace

        from trl.models.utils import _ForwardRedirection
        from trl.trainer.distillation_trainer import DistillationTrainer

        self._trainer = DistillationTrainer
        self.teacher_model, self.beta, self.temperature = teacher, beta, temperature
        self.accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True)
        self._forward_redirection = _ForwardRedirection()
        self.model_kwarg_keys = inspect.signature(student.forward).parameters.keys()
        self._is_vlm = False

    def _get_last_hidden_state(self, *args, **kwargs):
        return self._trainer._get_last_hidden_state(self, *args, **kwargs)

    def loss(self, student, inputs, num_items_in_batch=None):
        return self._trainer._compute_loss(self, student, inputs, num_items_in_batch)


def _completion_batch(vocab: int, batch: int = 3, prompt: int = 5, completion: int = 7):
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    completion_mask = torch.ones(batch, completion, dtype=torch.long)
    completion_mask[0, -3:] = 0  # padding after an early end of sequence
    completion_mask[1, -1:] = 0
    return {"prompt_ids": torch.randint(vocab, (batch, prompt), generator=g),
            "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
            "completion_ids": torch.randint(vocab, (batch, completion), generator=g),
            "completion_mask": completion_mask}


@pytest.fixture
def trl_patch():
    """kdops.integrations.trl, unpatched again after the test whatever happens."""
    pytest.importorskip("trl")
    from kdops.integrations import trl as kd_trl

    kd_trl.unpatch()
    yield kd_trl
    kd_trl.unpatch()


def test_trl_patch_is_idempotent_and_unpatch_restores(trl_patch):
    import trl.trainer.distillation_trainer as dt
    from trl.experimental.gkd import GKDTrainer

    stock_chunked, stock_jsd = dt._chunked_divergence_loss, GKDTrainer.__dict__["generalized_jsd_loss"]
    trl_patch.patch()
    trl_patch.patch()
    assert trl_patch.is_patched()
    assert dt._chunked_divergence_loss is trl_patch.chunked_divergence_loss
    assert GKDTrainer.generalized_jsd_loss is trl_patch.generalized_jsd_loss  # a staticmethod: plain function
    trl_patch.unpatch()
    trl_patch.unpatch()
    assert not trl_patch.is_patched()
    assert dt._chunked_divergence_loss is stock_chunked
    assert GKDTrainer.__dict__["generalized_jsd_loss"] is stock_jsd


def _loss_and_grads(student, teacher, inputs, beta, temperature, num_items_in_batch=None):
    student.zero_grad(set_to_none=True)
    loss, entropy_sum, n_valid = _TRLLossPath(student, teacher, beta, temperature).loss(student, inputs,
                                                                                       num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), entropy_sum, n_valid, grads


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Gemma2", "Cohere", "Granite"])
@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (1.0, 2.0), (0.5, 1.0), (0.2, 1.5)])
def test_trl_distillation_loss_patched_equals_stock(trl_patch, family, beta, temperature):
    """TRL's DistillationTrainer loss path, stock vs patched: the same loss, entropy sum, token
    count and student gradients (Gemma 2: softcapping; Cohere, Granite: logit scales)."""
    import trl.trainer.distillation_trainer as dt

    teacher, student = _tiny_causal_lms(family)
    inputs = _completion_batch(student.config.vocab_size)
    for num_items in (None, 29):
        assert dt._chunked_divergence_loss is not trl_patch.chunked_divergence_loss
        stock = _loss_and_grads(student, teacher, inputs, beta, temperature, num_items)
        trl_patch.patch()
        ours = _loss_and_grads(student, teacher, inputs, beta, temperature, num_items)
        trl_patch.unpatch()
        torch.testing.assert_close(ours[0], stock[0], rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(ours[1], stock[1], rtol=2e-5, atol=1e-5)
        assert int(ours[2]) == int(stock[2]) == int(inputs["completion_mask"].sum())
        assert ours[3].keys() == stock[3].keys() and "lm_head.weight" in ours[3]
        # two float32 computations summing in other orders, through the whole network: atol relative
        # to the largest element (a wrong chain rule or normalisation is off by O(1) of it)
        for name, expected in stock[3].items():
            assert_close_to_max(ours[3][name], expected, (1e-4, 1e-4))


def test_trl_chunked_divergence_loss_lm_head_bias_and_masks(trl_patch):
    """Direct call with biases, a float mask and a fully masked batch (loss 0, finite)."""
    import trl.trainer.distillation_trainer as dt

    stock = dt._chunked_divergence_loss
    B, K, Hs, Ht, V = 2, 9, 16, 24, 301
    h_s = torch.randn(B, K, Hs, requires_grad=True)
    h_t = torch.randn(B, K, Ht)
    w_s = (torch.randn(V, Hs) / 2).requires_grad_(True)
    b_s = torch.randn(V, requires_grad=True)
    w_t, b_t = torch.randn(V, Ht) / 2, torch.randn(V)
    mask = (torch.rand(B, K) > 0.3).float()
    for m in (mask, torch.zeros(B, K)):
        args = (h_s, h_t, w_s, w_t, m, 0.4)
        kw = dict(student_lm_head_bias=b_s, teacher_lm_head_bias=b_t, student_logit_scale=0.7,
                  teacher_final_logit_softcapping=2.5, temperature=1.3)
        expected = stock(*args, **kw)
        got = trl_patch.chunked_divergence_loss(*args, **kw)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=2e-5, atol=1e-6)
        params = (h_s, w_s, b_s)
        for a, b in zip(torch.autograd.grad(got[0], params), torch.autograd.grad(expected[0], params)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trl_training_steps_patched_follow_stock(trl_patch):
    """Four SGD steps of a Gemma 2 student (softcapped) through TRL's loss path: the patched
    run's losses and weights follow the stock run's."""

    seed = int(torch.randint(1 << 30, ()))

    def run(patched: bool):
        teacher, student = _tiny_causal_lms("Gemma2", seed=seed)
        opt = torch.optim.SGD(student.parameters(), lr=0.05)  # linear in the gradients (Adam's sign-like
        # steps would turn the float32 noise of near-zero gradients into differences of the learning rate)
        (trl_patch.patch if patched else trl_patch.unpatch)()
        losses = []
        torch.manual_seed(seed)
        batch = _completion_batch(student.config.vocab_size)  # one batch: its loss must fall
        for _ in range(4):
            loss, *_ = _TRLLossPath(student, teacher, beta=0.5, temperature=1.0).loss(student, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trl_patch.unpatch()
        return torch.tensor(losses), [p.detach().clone() for p in student.parameters()]

    stock_losses, stock_params = run(False)
    ours_losses, ours_params = run(True)
    assert stock_losses[-1] < stock_losses[0]
    torch.testing.assert_close(ours_losses, stock_losses, rtol=1e-4, atol=1e-6)
    for a, b in zip(ours_params, stock_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_trl_generalized_jsd_loss_equals_stock(trl_patch, beta, reduction, with_labels):
    from trl.experimental.gkd import GKDTrainer

    stock = GKDTrainer.generalized_jsd_loss
    s = torch.randn(3, 5, 37, requires_grad=True)
    t = torch.randn(3, 5, 37) * 2
    labels = torch.randint(37, (3, 5)) if with_labels else None
    if with_labels:
        labels[0, :2] = -100
    for num_items in (None, torch.tensor(11)):
        kw = dict(beta=beta, temperature=1.7, reduction=reduction, num_items_in_batch=num_items)
        expected = stock(s, t, labels, **kw)
        got = trl_patch.generalized_jsd_loss(s, t, labels, **kw)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
        weights = torch.randn(expected.shape)
        (g_stock,) = torch.autograd.grad((expected * weights).sum(), s)
        (g_ours,) = torch.autograd.grad((got * weights).sum(), s)
        torch.testing.assert_close(g_ours, g_stock, rtol=1e-4, atol=1e-6)


def test_trl_generalized_jsd_loss_behaviour(trl_patch):
    """TRL's own properties of generalized_jsd_loss, on the patched GKDTrainer: zero for equal
    inputs, beta 1 / 0 are the two KLs, JSD(beta = 0.5) symmetric, temperature matters, shapes."""
    import torch.nn.functional as F
    from trl.experimental.gkd import GKDTrainer

    trl_patch.patch()
    jsd = GKDTrainer.generalized_jsd_loss
    same = torch.randn(2, 3, 5)
    assert abs(jsd(same, same).item()) < 1e-6
    assert abs(jsd(torch.ones(1, 1, 5), torch.ones(1, 1, 5)).item()) < 1e-6
    s = torch.log(torch.tensor([[0.1, 0.9]])).unsqueeze(0)
    t = torch.log(torch.tensor([[0.9, 0.1]])).unsqueeze(0)
    kl_st = F.kl_div(F.log_softmax(t, -1), F.softmax(s, -1), reduction="batchmean")
    kl_ts = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    torch.testing.assert_close(jsd(s, t, beta=1), kl_st)
    torch.testing.assert_close(jsd(s, t, beta=0), kl_ts)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert jsd(a, b, beta=0) != jsd(a, b, beta=1)
    assert jsd(a, b, temperature=1) != jsd(a, b, temperature=2)
    assert jsd(a, b, beta=0.1) != jsd(b, a, beta=0.1)
    torch.testing.assert_close(jsd(a, b, beta=0.5), jsd(b, a, beta=0.5), rtol=1e-6, atol=1e-7)
    assert jsd(a, b).shape == jsd(a, b, reduction="sum").shape == jsd(a, b, reduction="mean").shape == ()
    assert jsd(a, b, reduction="none").shape == a.shape
    with pytest.raises(ValueError, match="beta"):
        jsd(a, b, beta=1.5)


# ------------------------------------------ Transformers: kdops.integrations.transformers


class _PaddedTokens(torch.utils.data.Dataset):
    """``n`` random sequences with example ids, each padded at its end by 0 to 5 positions."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(vocab, (n, length), generator=g)
        pad = torch.randint(0, 6, (n, 1), generator=g)
        self.attention_mask = (torch.arange(length) < length - pad).long()
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i],
                "example_ids": torch.tensor(i)}


def _trainer(tmp_path, student, steps=2, batch=4, teacher=None, **options):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from kdops.integrations.transformers import DistillationTrainer

    args_options = {k: options.pop(k) for k in ("gradient_accumulation_steps", "bf16", "gradient_checkpointing",
                                                 "learning_rate", "optim") if k in options}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch,
                             logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                             use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
                             **{"learning_rate": 1e-2, **args_options})
    return DistillationTrainer(model=student, args=args, train_dataset=_PaddedTokens(16, 12, student.config.vocab_size),
                               teacher=teacher, **options)


def _materialised_loss(student, teacher, batch, **options):
    """The reference on both models' own logits (their configs' scale / softcap applied by the
    models themselves), shifted, padding ignored."""
    features = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**features).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**features).logits[:, :-1]
    return kdops.reference.distill_loss(s, t, batch["labels"][:, 1:], **options)


@pytest.mark.parametrize("family", ["Llama", "Gemma2", "Cohere", "Granite"])
def test_transformers_trainer_loss_equals_materialised_logits(tmp_path, family):
    """compute_loss (hidden states + lm_head, the configs' logit scale / softcap in the fused
    pass) = the reference on the models' logits; gradients too."""
    teacher, student = _tiny_causal_lms(family)
    trainer = _trainer(tmp_path, student, teacher=teacher, temperature=1.5, hard_weight=0.3, divergence="jsd")
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    expected = _materialised_loss(student, teacher, batch, temperature=1.5, hard_weight=0.3, divergence="jsd")
    expected_grads = torch.autograd.grad(expected, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=2e-5, atol=1e-6)
    for (name, _), a, b in zip(student.named_parameters(), grads, expected_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_transformers_trainer_gradient_accumulation_is_exact(tmp_path):
    """2 micro-batches of 2 (gradient accumulation, uneven padding) = 1 batch of 4: the loss is
    normalised by num_items_in_batch, the token count of the whole step. Plain SGD, so that the
    step compares the gradients themselves: Adam's first step lr * g / (|g| + eps) turns the
    float32 rounding of a gradient element near eps into an lr-sized difference (a flaky failure)."""
    runs, seed = [], int(torch.randint(1 << 30, ()))
    initial = [p.detach().clone() for p in _tiny_causal_lms("Llama", seed=seed)[1].parameters()]
    for batch, accumulation in ((4, 1), (2, 2)):
        teacher, student = _tiny_causal_lms("Llama", seed=seed)
        trainer = _trainer(tmp_path / str(batch), student, steps=1, batch=batch, teacher=teacher, temperature=2.0,
                           gradient_accumulation_steps=accumulation, hard_weight=0.2, optim="sgd")
        trainer.train()
        runs.append([p.detach().clone() for p in student.parameters()])
    assert not any(torch.equal(a, b) for a, b in zip(runs[0], initial))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_transformers_trainer_gradient_checkpointing_and_bf16(tmp_path):
    """Gradient checkpointing: the same loss and gradients; bf16 autocast: close to float32 and
    the student trains (its loss falls over the steps)."""
    teacher, student = _tiny_causal_lms("Qwen2")
    plain = _trainer(tmp_path / "plain", student, teacher=teacher, temperature=2.0)
    batch = next(iter(plain.get_train_dataloader()))
    loss = plain.compute_loss(student, batch)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    checkpointed = plain.compute_loss(student, batch)
    torch.testing.assert_close(checkpointed, loss)
    for a, b in zip(torch.autograd.grad(checkpointed, list(student.parameters())), grads):
        torch.testing.assert_close(a, b)
    student.gradient_checkpointing_disable()

    bf16 = _trainer(tmp_path / "bf16", student, steps=6, teacher=teacher, temperature=2.0, bf16=True)
    with bf16.compute_loss_context_manager():
        autocast_loss = bf16.compute_loss(student, batch)
    assert autocast_loss.dtype == torch.float32
    torch.testing.assert_close(autocast_loss, loss.detach(), rtol=5e-2, atol=1e-3)
    bf16.train()
    losses = [entry["loss"] for entry in bf16.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_transformers_trainer_from_teacher_cache(tmp_path):
    """teacher_cache: the cached top-k of the same sequences through the fused sparse loss =
    the reference sparse loss on the student's logits; a cache that does not cover the batch's
    positions is refused."""
    from kdops.cache import build_cache

    teacher, student = _tiny_causal_lms("Llama")
    data = _PaddedTokens(16, 12, student.config.vocab_size)
    batches = [(list(range(i, i + 4)), data.input_ids[i:i + 4]) for i in range(0, 16, 4)]
    with torch.no_grad():
        cache = build_cache(lambda ids: teacher(input_ids=ids).logits, batches, tmp_path / "cache", k=16,
                            temperature=2.0, dtype="float32", progress=False)
    trainer = _trainer(tmp_path / "out", student, steps=2, teacher_cache=cache, hard_weight=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    soft = cache.read(batch["example_ids"].tolist())
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    shape = (4, 12, 16)
    expected = kdops.reference.sparse_distill_loss(
        s, soft.logprobs.reshape(shape)[:, :-1], soft.indices.reshape(shape)[:, :-1].long(), batch["labels"][:, 1:],
        temperature=2.0, rest_mass="bucket", hard_weight=0.1)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=2e-5, atol=1e-6)
    trainer.train()
    with pytest.raises(ValueError, match="tokens each"):
        trainer.compute_loss(student, {**batch, "input_ids": batch["input_ids"][:, :8],
                                       "attention_mask": batch["attention_mask"][:, :8],
                                       "labels": batch["labels"][:, :8]})


# ------------------------------------------- FSDP2 / tensor parallel: DTensor lm_head weights


def _route_spy():
    """Counts the calls of the gathered and the vocabulary-parallel loss in kdops.integrations._common."""
    from kdops.integrations import _common

    calls = []
    for name in ("fused_linear_distill_loss", "vocab_parallel_fused_linear_distill_loss"):
        def spy(*args, _name=name, _original=getattr(_common, name), **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        setattr(_common, name, spy)
    return calls


def _tensor_parallel_case(rank: int, world: int, mesh, calls: list) -> None:
    """TP: a ColwiseParallel lm_head (weight and bias DTensors Shard(0), uneven: V = 37 over the
    ranks) and the same rows on every rank: routed vocabulary-parallel; loss, entropy and the
    gradients to the hidden states, weight and bias equal one process's gathered path on the
    full tensors. Teacher lm_head plain (sliced to the rank's rows) or ColwiseParallel too; the
    student's hidden states plain or a DTensor sharded over the sequence (sequence parallelism)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from kdops.integrations.trl import chunked_divergence_loss

    g = torch.Generator().manual_seed(1)
    B, K, Hs, Ht, V = 2, 6, 8, 12, 37
    h_s, h_t = torch.randn(B, K, Hs, generator=g), torch.randn(B, K, Ht, generator=g)
    mask = (torch.rand(B, K, generator=g) > 0.3).long()
    student, teacher = nn.Linear(Hs, V), nn.Linear(Ht, V)
    with torch.no_grad():
        for module in (student, teacher):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)
    full = {name: p.detach().clone().requires_grad_(True) for name, p in student.named_parameters()}
    options = dict(beta=0.3, temperature=1.4, num_items_in_batch=11, student_final_logit_softcapping=3.0,
                   student_logit_scale=0.8, teacher_final_logit_softcapping=2.5)
    hidden_ref = h_s.clone().requires_grad_(True)
    ref = chunked_divergence_loss(hidden_ref, h_t, full["weight"], teacher.weight.detach(), mask,
                                  student_lm_head_bias=full["bias"], teacher_lm_head_bias=teacher.bias.detach(),
                                  **options)
    ref[0].backward()
    parallelize_module(student, mesh, ColwiseParallel())
    for teacher_parallel, sequence_parallel in ((False, False), (True, False), (True, True)):
        if teacher_parallel and not sequence_parallel:
            parallelize_module(teacher, mesh, ColwiseParallel())
        student.zero_grad(set_to_none=True)
        hidden = h_s.clone().requires_grad_(True)
        if sequence_parallel:
            hidden = distribute_tensor(h_s.clone(), mesh, [Shard(1)]).requires_grad_(True)
        del calls[:]
        loss, entropy, count = chunked_divergence_loss(hidden, h_t, student.weight, teacher.weight, mask,
                                                       student_lm_head_bias=student.bias,
                                                       teacher_lm_head_bias=teacher.bias, **options)
        loss.backward()
        what = f"teacher ColwiseParallel={teacher_parallel} hidden Shard(1)={sequence_parallel}"
        assert calls == ["vocab_parallel_fused_linear_distill_loss"], (what, calls)
        assert isinstance(student.weight.grad, DTensor), what
        torch.testing.assert_close(loss, ref[0], msg=what)
        torch.testing.assert_close(entropy, ref[1], msg=what)
        assert int(count) == int(ref[2]), what
        grad = hidden.grad.full_tensor() if sequence_parallel else hidden.grad
        torch.testing.assert_close(grad, hidden_ref.grad, msg=what)
        for name, p in student.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), full[name].grad, msg=f"{what}: {name}")


def _dtensor_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: lm_head weights as DTensors sharded over the vocabulary through
    kdops.integrations.trl.chunked_divergence_loss. Each rank its own rows (FSDP2's Shard(0)):
    gathered, the gradients against one process's on the full tensors; the same rows (tensor
    parallel): vocabulary-parallel (:func:`_tensor_parallel_case`). Writes None or the failure."""
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    error = None
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from kdops.integrations.trl import chunked_divergence_loss

        calls = _route_spy()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        B, K, Hs, Ht, V = 2, 5, 8, 12, 37
        h_s, h_t = torch.randn(world, B, K, Hs, generator=g), torch.randn(world, B, K, Ht, generator=g)
        w_s, w_t = torch.randn(V, Hs, generator=g), torch.randn(V, Ht, generator=g)
        masks = (torch.rand(world, B, K, generator=g) > 0.3).long()
        options = dict(beta=0.4, temperature=1.3, student_final_logit_softcapping=2.0, teacher_logit_scale=0.7)
        w_s_shards = distribute_tensor(w_s.clone(), mesh, [Shard(0)]).requires_grad_(True)
        w_t_shards = distribute_tensor(w_t.clone(), mesh, [Shard(0)])
        hidden = h_s[rank].clone().requires_grad_(True)
        loss, entropy, count = chunked_divergence_loss(hidden, h_t[rank], w_s_shards, w_t_shards, masks[rank],
                                                       **options)
        loss.backward()
        w_full = w_s.clone().requires_grad_(True)
        hidden_ref = h_s.clone().requires_grad_(True)
        ref = [chunked_divergence_loss(hidden_ref[r], h_t[r], w_full, w_t, masks[r], **options) for r in range(world)]
        (sum(r[0] for r in ref) / world).backward()  # the weight's gradient: the ranks' average (as FSDP's)
        torch.testing.assert_close(loss, ref[rank][0])
        torch.testing.assert_close(entropy, ref[rank][1])
        assert int(count) == int(masks[rank].sum())
        torch.testing.assert_close(hidden.grad, hidden_ref.grad[rank] * world)
        torch.testing.assert_close(w_s_shards.grad.full_tensor(), w_full.grad)
        assert calls[0] == "fused_linear_distill_loss", calls  # each rank's own rows: gathered
        _tensor_parallel_case(rank, world, mesh, calls)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        error = f"rank {rank}: {traceback.format_exc()}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(error, f)


def _spawn_two_ranks(worker, tmp_path, *args) -> None:
    """Runs ``worker(rank, 2, port, out_dir, *args)`` on two spawned processes (conftest.spawn_ranks);
    each writes None or its failure to rank<r>.json, which this asserts are None."""
    seen = spawn_ranks(worker, 2, tmp_path, *args, join_timeout_s=240, must_report=range(2))
    errors = [seen[r] for r in range(2)]
    assert errors == [None, None], "\n".join(e for e in errors if e)


def test_dtensor_lm_head_weights_two_gloo_ranks(tmp_path):
    pytest.importorskip("trl")
    _spawn_two_ranks(_dtensor_worker, tmp_path)


def _fsdp2_trainer_worker(rank: int, world: int, port: int, out_dir: str, seed: int) -> None:
    """One gloo rank: a tiny Llama student under FSDP2 ``fully_shard`` (each decoder layer and the
    root), trained 3 SGD steps on this rank's half of each global batch of 4 padded sequences
    through ``kdops.integrations.transformers.DistillationTrainer.compute_loss`` (the loss runs
    as the FSDP module's forward: its hooks gather the lm_head), ``num_items_in_batch`` the
    global token count and the loss times the world size (as the Trainer with
    ``average_tokens_across_devices``: FSDP averages the gradients). The same steps in one
    process on the whole batches: the same losses and parameters. Writes None or the failure."""
    import copy
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    error = None
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.set_num_threads(1)
        teacher, student = _tiny_causal_lms("Llama", seed=seed)
        single = copy.deepcopy(student)
        # the Trainer (and accelerate's state) is set up before the process group: one process's
        trainer = _trainer(Path(out_dir) / f"trainer{rank}", single, teacher=teacher, temperature=2.0,
                           hard_weight=0.2)
        data = _PaddedTokens(12, 12, student.config.vocab_size, seed=seed)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        mesh = init_device_mesh("cpu", (world,))
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(student, mesh=mesh)
        sharded_opt = torch.optim.SGD(student.parameters(), lr=0.05)
        single_opt = torch.optim.SGD(single.parameters(), lr=0.05)
        per_rank = 4 // world
        for step in range(3):
            batch = {k: getattr(data, k)[4 * step:4 * step + 4] for k in ("input_ids", "attention_mask", "labels")}
            count = (batch["labels"][:, 1:] != -100).sum()
            mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
            loss = trainer.compute_loss(student, mine, num_items_in_batch=count)
            sharded_opt.zero_grad()
            (loss * world).backward()
            sharded_opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            single_loss = trainer.compute_loss(single, batch, num_items_in_batch=count)
            single_opt.zero_grad()
            single_loss.backward()
            single_opt.step()
            torch.testing.assert_close(total, single_loss.detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: the global loss")
        moved = 0
        for (name, p), q, p0 in zip(student.named_parameters(), single.parameters(),
                                    _tiny_causal_lms("Llama", seed=seed)[1].parameters()):
            full = p.full_tensor().detach()
            moved += not torch.equal(full, p0)
            torch.testing.assert_close(full, q.detach(), rtol=1e-4, atol=1e-5, msg=name)
        assert moved > 0, "no parameter moved"
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        error = f"rank {rank}: {traceback.format_exc()}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(error, f)


def test_fsdp2_transformers_trainer_two_gloo_ranks(tmp_path):
    """kdops.integrations.transformers under FSDP2 fully_shard (CPU, gloo, 2 ranks) = one process."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _spawn_two_ranks(_fsdp2_trainer_worker, tmp_path, int(torch.randint(1 << 30, ())))


def test_bench_trl_smoke(tmp_path):
    """benchmarks/bench_trl.py end to end at a tiny size (two worker processes): a JSON row per method, the same
    loss in TRL's chunked path and kdops', the load average recorded."""
    import subprocess

    pytest.importorskip("trl")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_trl.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(script), "--vocab", "300", "--hidden", "32", "--batch", "1", "--seq", "16",
                    "--repeats", "1", "--warmup", "0", "--dtype", "bfloat16", "--methods", "trl-chunked",
                    "kdops", "--device", "cpu", "--out", str(tmp_path / "trl")], check=True, env=env,
                   capture_output=True, text=True)
    result = json.loads((tmp_path / "trl.json").read_text())
    assert [(r["dtype"], r["method"]) for r in result["rows"]] == [("bfloat16", "trl-chunked"), ("bfloat16", "kdops")]
    assert len(result["load_average_1_5_15_min"]["before"]) == 3
    for spread in result["relative_loss_spread"].values():
        assert spread < 1e-3
    assert "| bfloat16 | 300 | kdops |" in (tmp_path / "trl.md").read_text()
