"""kdops in the training loops users already have: a plain PyTorch loop (examples/plain_training_loop.py),
Hugging Face ``Trainer`` (examples/hf_distillation_trainer.py) and ``torch.compile`` of a whole step."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kdops

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
