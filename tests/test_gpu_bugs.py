"""Bugs that only a GPU would show (issue 12, section 2), reproduced on CPU under the Triton interpreter.

* int32 offsets: ``index * stride`` past 2^31 wraps in int32 (``tl.arange`` and int arguments
  below 2^31 are int32). Reached on CPU with ``torch.empty`` storages (pages are not touched
  until written) and ``as_strided`` views whose strides pass 2^31 while only a few rows are
  real; each case runs in a subprocess (a wrapped offset reads gigabytes before the tensor:
  a crash there fails the test instead of killing pytest) and must equal the same call on
  contiguous copies.
* out-of-range hard labels: the Triton kd / sparse kernels read ``s[label]`` unmasked; with
  the eager check skipped (as under torch.compile) such a row must be NaN (loss and gradient),
  as in the CUDA kernels; the eager check itself raises ValueError naming ``labels``.
* wrong device: every Triton launch goes through ``_common.launch`` with the tensors' device.
* duplicate top-k indices: refused with a ValueError naming ``topk_indices``.
* GPU block sizes: ``KDOPS_TRITON_GPU_BLOCKS=1`` keeps the interpreter from shrinking blocks;
  the kernels then run with the GPU's blocks, loop tails and masks.
* the attention relation on the test device (CUDA tensors for the triton and cuda backends on a
  GPU machine: the case ``make gpu-check`` runs for that family; the interpreter here).
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdops
from kdops import reference

from conftest import LOSS_TOL, RELATION_GRAD_TOL, assert_close, assert_close_to_max, interpreted, require

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[1]
BIG_STRIDE = 2**30 + 2**20  # below 2^31 (an int32 argument), twice it is past 2^31

# Imported by every isolated script: a view of ``shape`` / ``strides`` on a lazily allocated
# storage holding ``values`` (only the pages of its elements are touched).
_PRELUDE = f"""
import torch, kdops
BIG_STRIDE = {BIG_STRIDE}
def strided(values, strides):
    span = sum((n - 1) * s for n, s in zip(values.shape, strides)) + 1
    view = torch.empty(span, dtype=values.dtype).as_strided(values.shape, strides)
    view.copy_(values)
    return view
"""


def run_isolated(code: str, env: dict | None = None, timeout: int = 600) -> str:
    """Run ``code`` (after the prelude) in a fresh interpreter with TRITON_INTERPRET=1; assert it
    exits 0 (a crash or an assertion there fails here) and return its stdout."""
    full_env = {**os.environ, "TRITON_INTERPRET": "1", "KDOPS_POISON_OUTPUTS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


# --------------------------------------------------------------------------- int32 offsets


def test_multi_teacher_offset_past_int32():
    """K = 3 teachers with stride N*V < 2^31 but 2 N*V > 2^31 (e.g. N = 8192, V = 151936)."""
    run_isolated("""
        K, N, V = 3, 2, 40
        student = torch.randn(N, V).bfloat16().requires_grad_()
        t = torch.randn(K, N, V).bfloat16()
        teacher = strided(t, (BIG_STRIDE, V, 1))
        for div in ("forward_kl", "jsd", "hard"):
            got = kdops.distill_loss(student, teacher, divergence=div, reduction="none", backend="triton")
            (g_got,) = torch.autograd.grad(got.sum(), student)
            want = kdops.distill_loss(student, t, divergence=div, reduction="none", backend="triton")
            (g_want,) = torch.autograd.grad(want.sum(), student)
            assert torch.equal(got, want), (div, got, want)
            assert torch.equal(g_got, g_want), div
    """)


def test_angle_anchor_offset_past_int32():
    """RKD-A reads row r of the [B, B] squared distances at r * stride: past 2^31 for B >= 46341."""
    run_isolated("""
        import triton
        from kdops.backends.triton import affinity as k
        B = 3
        e = torch.rand(3, B, B) + 0.5
        e = e + e.transpose(1, 2)  # symmetric, as the kernel assumes
        rows = strided(e.permute(1, 0, 2), (BIG_STRIDE, B, 1))  # rows of E^s, E^t, dL/dE^s interleaved
        for grad in (False, True):
            outs = []
            for s, t, out in ((rows[:, 0], rows[:, 1], rows[:, 2]), (e[0].clone(), e[1].clone(), e[2].clone())):
                out = out if grad else torch.empty(1)
                # the rows of E stand for the features too (read where an angle is skewed)
                k._launch(k._angle_kernel, (1, 1), s.device, s, t, s, t, torch.ones(()), out, B, B, B, s.stride(0),
                          s.stride(0), t.stride(0), 1.0, GRAD=grad, BLOCK_M=k.ANGLE_BLOCK, BLOCK_N=k.ANGLE_BLOCK,
                          COMPUTE=k.tl.float32)
                outs.append(out)
            assert torch.equal(*outs), (grad, outs)  # (the grad output has the inputs' row stride)
    """)


def test_transposed_affinity_gradient_offset_past_int32():
    """The affinity backward reads dL/dA [B, B] with any strides: a transposed one has stride(1)
    = its row length, so j * stride(1) passes 2^31 for B >= 46341."""
    run_isolated("""
        from kdops.backends.triton import affinity as k
        B, D = 3, 8
        x = torch.randn(B, D)
        g = torch.randn(B, B)
        grad = strided(g, (1, BIG_STRIDE))
        for kind in (k.DOT, k.COSINE, k.EUCLIDEAN, k.SQUARED_EUCLIDEAN):
            a = k.affinity_forward(x, kind)
            assert torch.equal(k.affinity_backward(grad, x, a, kind), k.affinity_backward(g, x, a, kind)), kind
    """)


def test_fused_linear_column_offset_past_int32():
    """The fused-linear tiles read h[rows, k] at k * stride(1): a column-major hidden state
    (stride(1) = N) passes 2^31 at k * N >= 2^31."""
    run_isolated("""
        from kdops.backends.triton.fused_linear import fused_linear_distill
        from kdops.ops._common import DistillOptions
        N, H, V = 3, 20, 24
        h = torch.randn(N, H).bfloat16()
        w, th, tw = torch.randn(V, H).bfloat16(), torch.randn(N, H).bfloat16(), torch.randn(V, H).bfloat16()
        h_big = strided(h, (1, 2**27))  # 19 * 2**27 > 2**31
        opts = DistillOptions(2, 2.0, 0.5, 0.0, 4.0, -100, False)
        got = fused_linear_distill(h_big, w, None, th, tw, None, None, None, opts, [True, True, False])
        want = fused_linear_distill(h, w, None, th, tw, None, None, None, opts, [True, True, False])
        for a, b in zip(got, want):
            assert torch.equal(a, b), (a, b)
    """)


# --------------------------------------------------------------------------- labels


def _skip_label_check(monkeypatch):
    """What torch.compile does: the eager label range check does not run."""
    from kdops.ops import validation

    monkeypatch.setattr(validation, "check_labels_in_range", lambda *args, **kwargs: None)


@pytest.mark.parametrize("family", ["kd", "sparse_kd"])
def test_out_of_range_hard_label_gives_nan_row(monkeypatch, family):
    """Labels V + 3 and -5 (read unmasked they land in the neighbouring row): NaN loss and a NaN
    gradient row on the Triton backend, the other rows untouched."""
    _skip_label_check(monkeypatch)
    n, vocab = 4, 37
    student = torch.randn(n, vocab, requires_grad=True)
    labels = torch.tensor([vocab + 3, 1, -5, 2])
    if family == "kd":
        def loss(lab):
            return kdops.distill_loss(student, torch.randn(n, vocab), lab, hard_weight=0.5, reduction="none",
                                      backend="triton")
    else:
        topk = torch.randn(n, vocab).log_softmax(-1).topk(5)

        def loss(lab):
            return kdops.sparse_distill_loss(student, topk.values, topk.indices, lab, hard_weight=0.5,
                                             reduction="none", backend="triton")
    rows = loss(labels)
    (grad,) = torch.autograd.grad(rows.sum(), student)
    bad = torch.tensor([True, False, True, False])
    assert rows[bad].isnan().all() and rows[~bad].isfinite().all(), rows
    assert grad[bad].isnan().all() and grad[~bad].isfinite().all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_out_of_range_label_is_a_value_error_on_every_device(device):
    student = torch.randn(3, 11, device=device)
    labels = torch.tensor([1, 11, 2], device=device)
    for backend in [b for b, s in kdops.available_backends().items() if s.available]:
        try:
            kdops.distill_loss(student, student.flip(0), labels, hard_weight=0.5, backend=backend)
        except RuntimeError as e:  # a backend that cannot run on this device says so
            assert "cannot run this call" in str(e)
            continue
        except ValueError as e:
            assert "labels" in str(e)
            continue
        raise AssertionError(f"backend {backend} on {device}: no ValueError for label 11 with V = 11")


# --------------------------------------------------------------------------- device


def test_launch_helper_makes_the_tensors_device_current(monkeypatch):
    """Triton launches on the current device: the helper makes the tensors' device current."""
    from kdops.backends.triton import _common

    current = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, current[-1] if current else None, args, kwargs))

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    _common.launch(FakeKernel(), [2, 3], torch.device("cuda", 1), "x", num_warps=4)
    _common.launch(FakeKernel(), (5,), torch.device("cpu"), "y")
    assert launched == [((2, 3), torch.device("cuda", 1), ("x",), {"num_warps": 4}), ((5,), None, ("y",), {})]


def test_every_triton_launch_uses_the_tensors_device():
    """Each launcher (kd, sparse kd, fused linear, affinity, relation losses, attention relation) launches through
    ``_common.launch`` with its tensors' device (meta tensors here: nothing runs)."""
    code = """
        import sys, torch
        sys.path.insert(0, "tools")
        import aot_check
        from kdops.backends.triton import _common
        devices = []
        for module in ("kd", "sparse_kd", "fused_linear", "affinity", "attention_relation"):
            mod = sys.modules["kdops.backends.triton." + module] if "kdops.backends.triton." + module in sys.modules \\
                else __import__("kdops.backends.triton." + module, fromlist=["x"])
            original = mod.launch
            mod.launch = lambda kernel, grid, device, *a, _o=original, **kw: (
                devices.append(device), _o(kernel, grid, device, *a, **kw))
        m = aot_check.quick_matrix()
        launches = aot_check.capture(m)
        assert len(devices) == len(launches) > 0, (len(devices), len(launches))
        assert {d.type for d in devices} == {"meta"}, set(devices)
        print("launches", len(launches))
    """
    out = run_isolated(code, env={"TRITON_INTERPRET": ""})
    assert "launches" in out


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_duplicate_topk_indices_are_refused(backend):
    device = require(backend)
    student = torch.randn(3, 20, device=device)
    topk = torch.randn(3, 20, device=device).log_softmax(-1).topk(4)
    indices = topk.indices.clone()
    indices[1, 2] = indices[1, 0]
    with pytest.raises(ValueError, match="topk_indices"):
        kdops.sparse_distill_loss(student, topk.values, indices, backend=backend)
    kdops.sparse_distill_loss(student, topk.values, topk.indices, backend=backend)  # distinct: fine


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("rest_mass", ["ignore", "bucket"])
@pytest.mark.parametrize("k", [5, 37])
def test_out_of_range_topk_index_gives_nan_row(monkeypatch, backend, rest_mass, k):
    """Top-k indices V + 3 and -1 with the eager check skipped (as under torch.compile): a NaN
    loss and a NaN gradient row on every kernel backend, the other rows untouched; K = V too (no
    rest bucket). The Triton kernel marked such a row by a NaN top-k mass, which tl.maximum
    (1 - mass, 0) dropped: a finite loss, negative for reverse KL."""
    from kdops.ops import validation

    device = require(backend)
    monkeypatch.setattr(validation, "check_topk_indices", lambda *args, **kwargs: None)
    n, vocab = 4, 37
    student = torch.randn(n, vocab, device=device, requires_grad=True)
    topk = torch.randn(n, vocab, device=device).log_softmax(-1).topk(k)
    indices = topk.indices.clone()
    indices[0, 3], indices[2, k - 1] = vocab + 3, -1
    bad = torch.tensor([True, False, True, False], device=device)
    for divergence in ("forward_kl", "reverse_kl" if rest_mass == "bucket" else "jsd"):
        rows = kdops.sparse_distill_loss(student, topk.values, indices, torch.tensor([1, 2, 3, 4], device=device),
                                         hard_weight=0.25, divergence=divergence, rest_mass=rest_mass,
                                         reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(rows.sum(), student)
        assert rows[bad].isnan().all() and rows[~bad].isfinite().all(), (divergence, rows)
        assert grad[bad].isnan().all() and grad[~bad].isfinite().all(), divergence


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_out_of_range_topk_index_is_a_value_error_on_every_device(device):
    """V, -1 and an int64 index past 2^31 (the kernels take int32 indices: 2^32 + 1 would wrap
    to 1) are refused on every device, before any backend runs."""
    student = torch.randn(3, 11, device=device)
    topk = torch.randn(3, 11, device=device).log_softmax(-1).topk(4)
    for value in (11, -1, 2**32 + 1):
        indices = topk.indices.clone()
        indices[1, 2] = value
        for backend in [b for b, s in kdops.available_backends().items() if s.available]:
            with pytest.raises((ValueError, RuntimeError)) as error:
                kdops.sparse_distill_loss(student, topk.values, indices, backend=backend)
            assert f"topk_indices must lie in [0, 11); found {value} in row 1" in str(error.value) or \
                "cannot run this call" in str(error.value), str(error.value)


# --------------------------------------------------------------------------- GPU block sizes


def test_interpreter_runs_the_gpu_blocks_when_asked():
    """With KDOPS_TRITON_GPU_BLOCKS=1 the interpreter runs the GPU's block sizes: kd and sparse KD
    over two 4096-lane blocks and a tail, fused linear over 32 x 64 x 16 tiles with tails,
    relation losses over 64-row tiles with tails, each against the float64 reference."""
    run_isolated("""
        from kdops import reference
        from kdops.backends.triton import _common, kd, sparse_kd, fused_linear, affinity
        assert _common.GPU_BLOCKS and kd._MAX_BLOCK_V == 4096 and sparse_kd._MAX_BLOCK == 4096
        assert fused_linear._blocks(torch.float32)[:3] == (32, 64, 16) and affinity.BLOCK_K == 32
        torch.manual_seed(0)
        n, vocab = 3, 2 * 4096 + 37
        s, t = (torch.randn(n, vocab) * 3 for _ in range(2))
        labels = torch.tensor([5, -100, vocab - 1])
        for div in ("forward_kl", "reverse_kl", "jsd", "tvd"):
            for hard in (0.0, 0.5):
                x = s.clone().requires_grad_()
                got = kdops.distill_loss(x, t, labels, divergence=div, hard_weight=hard, reduction="none",
                                         backend="triton")
                (g,) = torch.autograd.grad(got.sum(), x)
                y = s.double().requires_grad_()
                want = kdops.distill_loss(y, t.double(), labels, divergence=div, hard_weight=hard,
                                          reduction="none", backend="torch")
                (gw,) = torch.autograd.grad(want.sum(), y)
                torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
                torch.testing.assert_close(g.double(), gw, rtol=2e-5, atol=1e-6)
        top = t.log_softmax(-1).topk(4100)  # two 4096 top-k blocks
        x = s.clone().requires_grad_()
        got = kdops.sparse_distill_loss(x, top.values, top.indices, labels, hard_weight=0.5, rest_mass="bucket",
                                        reduction="none", backend="triton")
        (g,) = torch.autograd.grad(got.sum(), x)
        y = s.double().requires_grad_()
        want = kdops.sparse_distill_loss(y, top.values.double(), top.indices, labels, hard_weight=0.5,
                                         rest_mass="bucket", reduction="none", backend="torch")
        (gw,) = torch.autograd.grad(want.sum(), y)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), gw, rtol=2e-5, atol=1e-6)
        N, H, V = 130, 70, 200  # tails in every tile dimension
        h, th = torch.randn(N, H), torch.randn(N, H)
        w, tw = torch.randn(V, H) / 8, torch.randn(V, H) / 8
        lab = torch.randint(0, V, (N,)); lab[::7] = -100
        x = h.clone().requires_grad_()
        got = kdops.fused_linear_distill_loss(x, w, th, tw, lab, temperature=2.0, hard_weight=0.5, divergence="jsd",
                                              backend="triton")
        (g,) = torch.autograd.grad(got, x)
        y = h.double().requires_grad_()
        want = reference.distill_loss(y @ w.double().T, th.double() @ tw.double().T, lab, temperature=2.0,
                                      hard_weight=0.5, divergence="jsd")
        (gw,) = torch.autograd.grad(want, y)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g.double(), gw, rtol=1e-3, atol=1e-5)
        B, D = 130, 70
        fs, ft = torch.randn(B, D), torch.randn(B, D + 3)
        for name in ("similarity_preserving_loss", "rkd_distance_loss"):
            x = fs.clone().requires_grad_()
            got = getattr(kdops, name)(x, ft, backend="triton")
            (g,) = torch.autograd.grad(got, x)
            y = fs.double().requires_grad_()
            want = getattr(kdops, name)(y, ft.double(), backend="torch")
            (gw,) = torch.autograd.grad(want, y)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(g.double(), gw, rtol=1e-3, atol=1e-3 * float(gw.abs().max()))
        for kind in ("dot", "cosine", "euclidean", "squared_euclidean"):
            x = fs.clone().requires_grad_()
            a = kdops.affinity(x, kind, backend="triton")
            (g,) = torch.autograd.grad(a.square().sum(), x)
            y = fs.double().requires_grad_()
            aw = kdops.affinity(y, kind, backend="torch")
            (gw,) = torch.autograd.grad(aw.square().sum(), y)
            torch.testing.assert_close(a.double(), aw, rtol=1e-4, atol=1e-4 * float(aw.abs().max()))
            torch.testing.assert_close(g.double(), gw, rtol=1e-3, atol=1e-3 * float(gw.abs().max()))
        print("OK")
    """, env={"KDOPS_TRITON_GPU_BLOCKS": "1"})


# --------------------------------------------------------------------------- attention relation on the device


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_relation_on_the_test_device(backend, dtype):
    """Loss and both gradients of the attention relation vs the float64 reference, on the device
    a GPU machine gives ``backend`` (CUDA tensors), over several 32 x 32 tiles each way with a
    partial last tile, padding, a fully masked sample, causal and not, every divergence on a GPU
    (two under the interpreter); teacher head size 128 on a GPU (the largest teacher tile)."""
    device = require(backend)
    small = interpreted(backend)
    batch, heads, length, dim, teacher_dim = (2, 2, 70, 16, 24) if small else (3, 3, 200, 64, 128)
    divergences = ("forward_kl", "jsd") if small else ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                                        "skew_reverse_kl", "tvd")
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 3:] = 0
    mask[-1] = 0
    inputs = [torch.randn(batch, heads, length, d, dtype=torch.float64) for d in (dim, dim, teacher_dim, teacher_dim)]
    for divergence in divergences:
        for causal in (False, True):
            options = dict(causal=causal, attention_mask=mask, divergence=divergence, beta=0.3, reduction="none")
            sa, sb, ta, tb = (x.to(device=device, dtype=dtype) for x in inputs)
            sa.requires_grad_()
            sb.requires_grad_()
            got = kdops.attention_relation_loss(sa, sb, ta, tb, backend=backend,
                                                **{**options, "attention_mask": mask.to(device)})
            weights = torch.rand(got.shape, dtype=torch.float64)
            g_sa, g_sb = torch.autograd.grad((got * weights.to(device, got.dtype)).sum(), (sa, sb))
            ref = [x.detach().cpu().double().requires_grad_(i < 2) for i, x in enumerate((sa, sb, ta, tb))]
            want = reference.attention_relation_loss(*ref, **options)
            e_sa, e_sb = torch.autograd.grad((want * weights).sum(), ref[:2])
            assert_close(got.cpu(), want, LOSS_TOL[dtype])
            for g, e in ((g_sa, e_sa), (g_sb, e_sb)):
                assert g.dtype == dtype and g.device.type == device
                assert_close_to_max(g.cpu(), e, RELATION_GRAD_TOL[dtype])
