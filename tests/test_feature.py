"""Feature-based distillation: kdops.hint_loss (FitNets) and kdops.attention_transfer_loss (AT)."""
import re

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops import reference

from conftest import RELATION_GRAD_TOL, RELATION_LOSS_TOL, assert_close_to_max


def test_hint_is_mse():
    f_s, f_t = torch.randn(4, 8, 3, 3, dtype=torch.float64), torch.randn(4, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(kdops.hint_loss(f_s, f_t), F.mse_loss(f_s, f_t))


def test_adapter_is_a_1x1_convolution_and_a_linear_layer():
    adapter = kdops.nn.Adapter(6, 10)
    conv = torch.nn.Conv2d(6, 10, 1)
    with torch.no_grad():
        conv.weight.copy_(adapter.linear.weight[:, :, None, None])
        conv.bias.copy_(adapter.linear.bias)
    maps = torch.randn(3, 6, 5, 4)
    torch.testing.assert_close(adapter(maps), conv(maps))
    vectors = torch.randn(3, 6)
    torch.testing.assert_close(adapter(vectors), adapter.linear(vectors))
    with pytest.raises(ValueError, match="6 channels in dim 1"):
        adapter(torch.randn(3, 5, 6))


def test_hint_with_adapter_trains_student_and_adapter_only():
    crit = kdops.nn.HintLoss(kdops.nn.Adapter(6, 10))
    assert any(p is crit.adapter.linear.weight for p in crit.parameters())
    f_s = torch.randn(2, 6, 4, 4, requires_grad=True)
    f_t = torch.randn(2, 10, 4, 4, requires_grad=True)
    loss = crit(f_s, f_t)
    expected = F.mse_loss(crit.adapter(f_s), f_t)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert f_s.grad is not None and crit.adapter.linear.weight.grad is not None and f_t.grad is None


def test_hint_with_any_callable_adapter():
    f_s, f_t = torch.randn(5, 7), torch.randn(5, 3)
    linear = torch.nn.Linear(7, 3)
    torch.testing.assert_close(kdops.hint_loss(f_s, f_t, linear), F.mse_loss(linear(f_s), f_t))
    torch.testing.assert_close(kdops.hint_loss(f_s, f_t, lambda x: x[:, :3]), F.mse_loss(f_s[:, :3], f_t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    f_s = (torch.randn(4, 16, 6, 6) * 3).to(dtype).requires_grad_(True)
    f_t = (torch.randn(4, 8, 6, 6) * 3).to(dtype)
    for loss_fn, ref_fn in ((kdops.hint_loss, reference.hint_loss),
                            (kdops.attention_transfer_loss, reference.attention_transfer_loss)):
        target = f_t if loss_fn is kdops.attention_transfer_loss else f_t.repeat(1, 2, 1, 1)
        f_s.grad = None
        loss = loss_fn(f_s, target)
        loss.backward()
        s64 = f_s.detach().double().requires_grad_(True)
        ref = ref_fn(s64, target.double())
        ref.backward()
        assert loss.dtype == torch.float32 and f_s.grad.dtype == dtype
        assert_close_to_max(loss, ref, RELATION_LOSS_TOL[dtype])
        assert_close_to_max(f_s.grad, s64.grad, RELATION_GRAD_TOL[dtype])


def test_attention_transfer_matches_the_original():
    """Zagoruyko & Komodakis's code: at(x) = F.normalize(x.pow(2).mean(1).view(B, -1))."""
    def at(x):
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    f_s, f_t = torch.randn(3, 16, 7, 7, dtype=torch.float64), torch.randn(3, 32, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(kdops.attention_transfer_loss(f_s, f_t), (at(f_s) - at(f_t)).pow(2).mean())


@pytest.mark.parametrize("p", [1.0, 3.0, 4])
def test_attention_transfer_powers_and_channel_sum(p):
    """|f|^p; the channel mean and the channel sum give the same normalised map."""
    f_s, f_t = torch.randn(2, 5, 4, 3, dtype=torch.float64), torch.randn(2, 9, 4, 3, dtype=torch.float64)

    def at_sum(f):
        return F.normalize(f.abs().pow(p).sum(1).flatten(1))

    torch.testing.assert_close(kdops.attention_transfer_loss(f_s, f_t, p), (at_sum(f_s) - at_sum(f_t)).pow(2).mean())
    torch.testing.assert_close(kdops.nn.AttentionTransferLoss(p)(f_s, f_t), kdops.attention_transfer_loss(f_s, f_t, p))


def test_attention_transfer_1d_and_3d_maps_and_zero():
    for shape in ((3, 4, 10), (2, 3, 2, 3, 4)):
        f = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        loss = kdops.attention_transfer_loss(f, f.detach() * 2)  # a scale does not change the map
        loss.backward()
        assert loss.item() < 1e-30 and f.grad.abs().max() < 1e-15


def test_gradcheck_float64():
    f_s = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 5, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: kdops.attention_transfer_loss(s, f_t), (f_s,))
    adapter = kdops.nn.Adapter(3, 5).double()
    assert torch.autograd.gradcheck(lambda s: kdops.hint_loss(s, f_t, adapter), (f_s,))


def test_teacher_gets_no_gradient():
    f_s = torch.randn(2, 4, 3, 3, requires_grad=True)
    f_t = torch.randn(2, 4, 3, 3, requires_grad=True)
    (kdops.hint_loss(f_s, f_t) + kdops.attention_transfer_loss(f_s, f_t)).backward()
    assert f_t.grad is None and f_s.grad is not None


def test_torch_compile_fullgraph():
    adapter = kdops.nn.Adapter(4, 6)

    def step(s, t):
        return kdops.hint_loss(s, t, adapter) + kdops.attention_transfer_loss(s, t)

    f_s, f_t = torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = f_s.clone().requires_grad_(True), f_s.clone().requires_grad_(True)
    eager, got = step(s1, f_t), compiled(s2, f_t)
    eager.backward()
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


def _bad_calls():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    hint, at = kdops.hint_loss, kdops.attention_transfer_loss
    return [
        (hint, (s.long(), t), {}, TypeError, "f_s must be float32"),
        (hint, (s, [1.0]), {}, TypeError, "f_t must be a torch.Tensor"),
        (hint, (s, t), {}, ValueError, "f_t must have the shape of f_s (pass an adapter"),
        (hint, (s, t, kdops.nn.Adapter(4, 6)), {}, ValueError, "f_t must have the shape of adapter(f_s)"),
        (hint, (s, t, "conv"), {}, TypeError, "adapter must be a module or callable"),
        (hint, (s, t, lambda x: x.tolist()), {}, TypeError, "adapter must return a torch.Tensor"),
        (hint, (s, torch.randn(2, 4, 3, 3, device="meta")), {}, ValueError, "f_t is on meta"),
        (at, (s, t.int()), {}, TypeError, "f_t must be float32"),
        (at, (torch.randn(2, 4), torch.randn(2, 4)), {}, ValueError, "f_s must be a feature map (B, C, *spatial)"),
        (at, (s, torch.randn(3, 8, 3, 3)), {}, ValueError, "f_t must have the batch size of f_s"),
        (at, (s, torch.randn(2, 8, 4, 3)), {}, ValueError, "f_t must have the spatial size of f_s"),
        (at, (s, t), dict(p=0.5), ValueError, "p must be a finite number >= 1"),
        (at, (s, t), dict(p=float("inf")), ValueError, "p must be a finite number >= 1"),
        (at, (s, t), dict(p="2"), TypeError, "p must be a number"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    fn, args, kwargs, error, text = _bad_calls()[case]
    with pytest.raises(error, match=re.escape(text)):
        fn(*args, **kwargs)
