"""kdops.recipes at tiny sizes (seconds): sampling, continuation losses against the float64
reference, GKD, sequence-level KD, int8 fake quantisation (QAT / PTQ), preference tuning,
distillation from top-k and sampled caches."""
import copy
import math

import pytest
import torch
from torch import nn

import kdops
from kdops import recipes
from kdops.cache import build_cache
from kdops.demo.language_model import TinyLM

V, CONTEXT = 37, 12


def tiny(width: int = 16, layers: int = 1) -> TinyLM:
    return TinyLM(V, width, layers, CONTEXT)


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend only on the last token: ``lm_head(embed(x))``."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        return self.embed(ids)


def teacher_student():
    teacher = tiny(32).requires_grad_(False)
    return teacher, tiny(16)


def reference_kd(student, teacher, sequences, prompt_len, **options):
    """Float64 reference of continuation_distill_loss: materialised logits of both models."""
    inputs = sequences[:, :-1]
    with torch.no_grad():
        s = student.lm_head(student(inputs))[:, prompt_len - 1:].double()
        t = teacher.lm_head(teacher(inputs))[:, prompt_len - 1:].double()
    labels = sequences[:, prompt_len:] if options.get("hard_weight", 0) > 0 else None
    return kdops.reference.distill_loss(s, t, labels, **options)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sample_draws_from_the_tempered_softmax(temperature):
    model = Bigram(8, 4)
    n = 20000
    prompts = torch.full((n, 1), 3)
    out = recipes.generation.sample(model, prompts, 1, temperature=temperature,
                                    generator=torch.Generator().manual_seed(1))
    assert out.shape == (n, 2) and torch.equal(out[:, 0], prompts[:, 0])
    with torch.no_grad():
        p = torch.softmax(model.lm_head(model.embed.weight[3]).double() / temperature, -1)
    freq = torch.bincount(out[:, 1], minlength=8).double() / n
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3), (freq, p)


def test_sample_keeps_prompt_mode_and_is_reproducible():
    model = tiny()
    prompts = torch.randint(V, (3, 5))
    a = recipes.generation.sample(model, prompts, 6, generator=torch.Generator().manual_seed(7))
    b = recipes.generation.sample(model, prompts, 6, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 11) and torch.equal(a[:, :5], prompts) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < V
    assert model.training  # restored
    model.eval()
    recipes.generation.sample(model, prompts, 1)
    assert not model.training


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"new_tokens": 0}, "new_tokens"), ({"prompts": torch.zeros(2, 3)}, "prompts"),
    ({"prompts": torch.zeros(2, 0, dtype=torch.long)}, "prompts"),
])
def test_sample_bad_input(kwargs, match):
    args = {"prompts": torch.zeros(2, 3, dtype=torch.long), "new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        recipes.generation.sample(tiny(), args.pop("prompts"), args.pop("new_tokens"), **args)


def test_continuation_nll_against_reference():
    model = tiny()
    seq = torch.randint(V, (3, 10))
    got = recipes.generation.continuation_nll(model, seq, 4)
    with torch.no_grad():
        logits = model.lm_head(model(seq[:, :-1])).double()
    logp = torch.log_softmax(logits, -1)
    want = -logp[:, 3:].gather(-1, seq[:, 4:, None]).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_len"):
        recipes.generation.continuation_nll(model, seq, 10)
    with pytest.raises(ValueError, match="sequences"):
        recipes.generation.continuation_nll(model, seq.float(), 2)


@pytest.mark.parametrize("divergence, hard_weight", [("forward_kl", 0.0), ("reverse_kl", 0.0),
                                                     ("jsd", 0.0), ("forward_kl", 0.3)])
def test_continuation_distill_loss_against_reference(divergence, hard_weight):
    teacher, student = teacher_student()
    seq = torch.randint(V, (3, 11))
    got = recipes.generation.continuation_distill_loss(student, teacher, seq, 5, divergence=divergence,
                                                       temperature=2.0, hard_weight=hard_weight)
    want = reference_kd(student, teacher, seq, 5, divergence=divergence, temperature=2.0, hard_weight=hard_weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    got.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_on_policy_loss_is_the_divergence_on_the_students_samples():
    teacher, student = teacher_student()
    prompts = torch.randint(V, (4, 5))
    loss, seq = recipes.on_policy.on_policy_loss(student, teacher, prompts, 6, divergence="reverse_kl",
                                                 generator=torch.Generator().manual_seed(3))
    assert seq.shape == (4, 11) and torch.equal(seq[:, :5], prompts)
    again = recipes.generation.sample(student, prompts, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seq, again)  # the samples are the student's own
    want = reference_kd(student, teacher, seq, 5, divergence="reverse_kl", temperature=1.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0


def test_gkd_loss_mixes_on_policy_and_supervised_batches():
    teacher, student = teacher_student()
    seq = torch.randint(V, (4, 11))
    supervised = recipes.on_policy.gkd_loss(student, teacher, seq, 5, on_policy_fraction=0.0)
    torch.testing.assert_close(supervised.double(), reference_kd(student, teacher, seq, 1, divergence="reverse_kl",
                                                                 temperature=1.0), rtol=1e-4, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    on = recipes.on_policy.gkd_loss(student, teacher, seq, 5, on_policy_fraction=1.0, generator=g)
    g2 = torch.Generator().manual_seed(5)
    torch.rand((), generator=g2)  # the coin
    want, _ = recipes.on_policy.on_policy_loss(student, teacher, seq[:, :5], 6, generator=g2)
    torch.testing.assert_close(on, want)
    g = torch.Generator().manual_seed(0)
    draws = [torch.rand((), generator=g).item() < 0.5 for _ in range(200)]
    assert 60 < sum(draws) < 140
    with pytest.raises(ValueError, match="on_policy_fraction"):
        recipes.on_policy.gkd_loss(student, teacher, seq, 5, on_policy_fraction=1.5)


def test_sequence_level_corpus_and_losses():
    teacher, student = teacher_student()
    prompts = torch.randint(V, (7, 4))
    corpus = recipes.sequence_level.generate_corpus(teacher, prompts, 8, temperature=0.7, batch_size=3,
                                                    generator=torch.Generator().manual_seed(0))
    assert corpus.shape == (7, 12) and torch.equal(corpus[:, :4], prompts)
    ce = recipes.sequence_level.sequence_level_loss(student, corpus, 4)
    torch.testing.assert_close(ce, recipes.generation.continuation_nll(student, corpus, 4))
    mixed = recipes.sequence_level.sequence_level_loss(student, corpus, 4, teacher=teacher, hard_weight=0.5,
                                                       temperature=2.0)
    want = reference_kd(student, teacher, corpus, 4, temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(mixed.double(), want, rtol=1e-4, atol=1e-6)
    only_ce = recipes.sequence_level.sequence_level_loss(student, corpus, 4, teacher=teacher, hard_weight=1.0)
    torch.testing.assert_close(only_ce, ce, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hard_weight"):
        recipes.sequence_level.sequence_level_loss(student, corpus, 4, teacher=teacher, hard_weight=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        recipes.sequence_level.generate_corpus(teacher, prompts, 2, batch_size=0)


def assert_on_int8_grid(model):
    weights = recipes.quantized.int8_weights(model)
    assert set(weights) >= {"lm_head.weight", "embed.weight", "layers.layers.0.self_attn.in_proj_weight",
                            "layers.layers.0.linear1.weight"}
    for name, q in weights.items():
        module_name, param = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        fq = getattr(module.parametrizations, param)[0].fake_quant
        w = getattr(module, param).detach()
        scale = fq.scale.view(-1, *([1] * (w.dim() - 1)))
        assert q.dtype == torch.int8
        torch.testing.assert_close(w, q.float() * scale, rtol=0, atol=1e-6 * scale.max().item())
        # per-channel symmetric: each row's largest |w| is (close to) 127.5 s, so it uses the range
        assert (q.int().abs().amax(1) >= 127).all()


def test_qat_weights_on_the_int8_grid_and_straight_through():
    teacher, student = teacher_student()
    raw = copy.deepcopy(student)
    recipes.quantized.prepare(student)
    seq = torch.randint(V, (3, CONTEXT + 1))
    loss = recipes.generation.continuation_distill_loss(student, teacher, seq, 1)
    loss.backward()
    grad = student.lm_head.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    assert_on_int8_grid(student)
    with torch.no_grad():  # the quantised model is close to, but not exactly, the float one
        diff = (student.lm_head(student(seq[:, :-1])) - raw.lm_head(raw(seq[:, :-1]))).abs().max()
    assert 0 < diff < 0.1
    with pytest.raises(ValueError, match="once"):
        recipes.quantized.prepare(student)


def test_freeze_fixes_the_scales():
    model = recipes.quantized.prepare(tiny(), activations=True)
    seq = torch.randint(V, (2, CONTEXT))
    model(seq)
    recipes.quantized.freeze(model)
    fq = model.lm_head.parametrizations.weight[0].fake_quant
    scale = fq.scale.clone()
    act_scale = model.lm_head.input_fake_quant.scale.clone()
    with torch.no_grad():
        model.lm_head.parametrizations.weight.original.mul_(3.0)
    model(seq * 0 + 1)
    assert torch.equal(fq.scale, scale) and torch.equal(model.lm_head.input_fake_quant.scale, act_scale)


def test_activations_quantised_to_8_bits_in_eval():
    model = recipes.quantized.prepare(tiny(), activations=True)
    seq = torch.randint(V, (4, CONTEXT))
    model(seq)  # training mode: the observers see the activations
    model.eval()
    quantizer = model.lm_head.input_fake_quant
    scale = quantizer.scale.clone()
    with torch.no_grad():
        h = model(seq)  # the lm_head's input, quantised by the model's forward hook
    codes = h / quantizer.scale + quantizer.zero_point
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 255 + 1e-3
    assert torch.equal(quantizer.scale, scale)  # evaluation observes nothing
    assert hasattr(model.layers.layers[0].linear1, "input_fake_quant")


def test_post_training_quantisation():
    model = tiny()
    seq = torch.randint(V, (4, CONTEXT))
    with torch.no_grad():
        before = model.lm_head(model(seq))
    ptq = recipes.quantized.quantize_post_training(copy.deepcopy(model), lambda m: m(seq))
    assert_on_int8_grid(ptq)
    with torch.no_grad():
        after = ptq.lm_head(ptq(seq))
    assert 0 < (after - before).abs().max() < 0.05
    assert ptq.training  # mode kept


def test_preference_tuning_loss_against_reference():
    reference = tiny(24).requires_grad_(False)
    model = tiny(16)
    ids = torch.randint(V, (3, CONTEXT))
    reward = (torch.rand(V) < 0.3).float()
    got = recipes.preference.preference_tuning_loss(model, reference, ids, reward, beta=0.5)
    with torch.no_grad():
        target = reference.lm_head(reference(ids)).double() + reward.double() / 0.5
        logits = model.lm_head(model(ids)).double()
    want = kdops.reference.distill_loss(logits, target, temperature=1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    same = recipes.preference.preference_tuning_loss(copy.deepcopy(reference), reference, ids, torch.zeros(V))
    assert abs(same.item()) < 1e-5
    with pytest.raises(ValueError, match="beta"):
        recipes.preference.preference_tuning_loss(model, reference, ids, reward, beta=0.0)
    with pytest.raises(ValueError, match="reward"):
        recipes.preference.preference_tuning_loss(model, reference, ids, reward[:-1])


def test_preference_tuning_moves_mass_to_the_preferred_tokens():
    reference = tiny(16).requires_grad_(False)
    model = copy.deepcopy(reference).requires_grad_(True)
    preferred = torch.zeros(V, dtype=torch.bool)
    preferred[:5] = True
    ids = torch.randint(V, (8, CONTEXT))

    def mass(m):
        with torch.no_grad():
            return torch.softmax(m.lm_head(m(ids)), -1)[..., preferred].sum(-1).mean().item()

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = recipes.preference.preference_tuning_loss(model, reference, ids, preferred.float(), beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p_ref = torch.softmax(reference.lm_head(reference(ids)).double(), -1)
    tilted = p_ref * torch.where(preferred, math.exp(2.0), 1.0).double()
    target = (tilted[..., preferred].sum(-1) / tilted.sum(-1)).mean().item()
    assert mass(reference) < mass(model) and abs(mass(model) - target) < 0.5 * (target - mass(reference))


def test_preference_rate():
    preferred = torch.tensor([True, False, False, True])
    seq = torch.tensor([[0, 0, 1, 3], [3, 2, 2, 2]])
    assert recipes.preference.preference_rate(seq, 2, preferred) == pytest.approx(1 / 4)
    assert recipes.preference.preference_rate(seq, 0, preferred) == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="preferred"):
        recipes.preference.preference_rate(seq, 1, preferred.float())
    with pytest.raises(ValueError, match="prompt_len"):
        recipes.preference.preference_rate(seq, 4, preferred)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_cached_distill_loss_against_reference(mode, tmp_path):
    teacher, student = teacher_student()
    windows = torch.randint(V, (5, CONTEXT + 1))
    T, k = 2.0, (V if mode == "topk" else 6)
    extra = {"dtype": "float32"} if mode == "topk" else {"seed": 0}
    cache = build_cache(lambda ids: teacher.lm_head(teacher(ids)), [([0, 1, 2], windows[:3, :-1]),
                                                                   ([3, 4], windows[3:, :-1])],
                        tmp_path / mode, k=k, temperature=T, mode=mode, progress=False, **extra)
    ids = [4, 1, 2]
    got = recipes.cached.cached_distill_loss(student, cache, ids, windows[ids], hard_weight=0.3)
    with torch.no_grad():
        s = student.lm_head(student(windows[ids, :-1])).double().flatten(0, 1)
        if mode == "topk":  # all V kept: dense KD
            t = teacher.lm_head(teacher(windows[ids, :-1])).double().flatten(0, 1)
        else:  # the target is counts / k; logits T log(counts / k) give it at temperature T
            soft = cache.read(ids)
            q = torch.zeros_like(s).scatter_add_(1, soft.indices.long(), soft.logprobs.double().exp())
            assert torch.allclose(q.sum(1), torch.ones(q.shape[0], dtype=q.dtype))
            t = T * q.log()
    want = kdops.reference.distill_loss(s, t, windows[ids, 1:].flatten(), temperature=T, hard_weight=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="example ids"):
        recipes.cached.cached_distill_loss(student, cache, [0, 1], windows[:3])
    with pytest.raises(ValueError, match="tokens"):
        recipes.cached.cached_distill_loss(student, cache, [0, 1], windows[:2, :-2])
