"""Relation-based distillation (kdops.affinity, SP, RKD-D, RKD-A) on every backend available here
against the float64 reference; the Triton kernels run under TRITON_INTERPRET=1 without a GPU."""
import re

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops import reference
from kdops.ops import affinity as ops

from conftest import BACKENDS, RELATION_GRAD_TOL, RELATION_LOSS_TOL, assert_close_to_max, interpreted, require

KINDS = ["dot", "cosine", "euclidean", "squared_euclidean"]
# name -> (kdops loss, reference loss, smallest batch)
LOSSES = {
    "sp": (kdops.similarity_preserving_loss, reference.similarity_preserving_loss, 1),
    "rkd_distance": (kdops.rkd_distance_loss, reference.rkd_distance_loss, 2),
    "rkd_angle": (kdops.rkd_angle_loss, reference.rkd_angle_loss, 3),
}
# (B, D_student, D_teacher, dtype): odd sizes, D = 1 / 33 / 1000, several tiles at B = 65 and 257
CASES = [
    (2, 1, 1, torch.float64),
    (3, 33, 7, torch.float64),
    (17, 1000, 33, torch.float32),
    (17, 33, 1000, torch.bfloat16),
    (17, 33, 7, torch.float16),
    (65, 9, 4, torch.float32),
    (257, 5, 3, torch.float64),  # not for the Triton interpreter: B = 65 and 150 cover several tiles
]


def features(batch, dim, dtype, device):
    return torch.randn(batch, dim).to(dtype).to(device)


def check_loss(name, backend, f_s, f_t, loss_tol=None, tol=None, **options):
    """kdops loss and student gradient against the float64 reference; returns both. (RKD-A of
    1-D features: every angle is 0 or 180 degrees, the gradient 0 up to rounding.)"""
    loss_fn, ref_fn, _ = LOSSES[name]
    s = f_s.detach().clone().requires_grad_(True)
    loss = loss_fn(s, f_t, backend=backend, **options)
    loss.backward()
    s64 = f_s.detach().double().requires_grad_(True)
    ref = ref_fn(s64, f_t.double(), **options)
    ref.backward()
    assert loss.shape == () and loss.dtype == (torch.float64 if f_s.dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == f_s.dtype and s.grad.shape == f_s.shape
    # the losses compare normalised quantities (|cos| <= 1, d / mu ~ 1): their natural size is 1
    assert_close_to_max(loss, ref, loss_tol or RELATION_LOSS_TOL[f_s.dtype], floor=1.0)
    if name == "rkd_angle" and f_s[0].numel() == 1:
        assert s.grad.abs().max() < 1e-12 and s64.grad.abs().max() < 1e-12
    else:
        grad_tol = tol or RELATION_GRAD_TOL[f_s.dtype]
        grad_size = abs(ref.item()) / float(f_s.abs().max())  # |dL/dx| without cancellation
        if name == "rkd_distance" and f_s.dtype != torch.float64 and options.get("smooth_l1_beta", 1.0) > 0:
            grad_size = max(grad_size, rkd_distance_rounding(f_s, f_t, options.get("smooth_l1_beta", 1.0))
                            / grad_tol[1])
        assert_close_to_max(s.grad, s64.grad, grad_tol, floor=grad_size)
    return loss, s.grad


def rkd_distance_rounding(f_s, f_t, beta):
    """The float32 rounding bound of RKD-D's student gradient. Each pair's ``z = d_s / mu_s -
    d_t / mu_t`` is a difference of O(1) terms that nearly cancel where the student matches the
    teacher; with a few roundings of each term, ``|dz_ij| <= 4 eps (u^s_ij + u^t_ij)`` (``u = d /
    mu``), and ``h'`` has slope ``1 / beta``, so row i's gradient carries up to ``2 * 2 / (P mu_s
    beta) * sum_j |dz_ij|`` (the pair terms, and as much again through ``mu_s``)."""
    s, t = f_s.detach().double(), f_t.detach().double()
    d_s, d_t = torch.cdist(s, s), torch.cdist(t, t)
    pairs = s.shape[0] * (s.shape[0] - 1)
    mu_s, mu_t = d_s.sum() / pairs, d_t.sum() / pairs
    dz = 4 * 2.0**-24 * (d_s / mu_s + d_t / mu_t)
    return float(4 / (pairs * mu_s * beta) * dz.sum(1).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{str(c[3])[6:]}")
def test_affinity_matches_reference(backend, kind, case):
    batch, dim, _, dtype = case
    device = require(backend, dtype, "affinity")
    if batch > 65 and interpreted(backend):
        pytest.skip("slow in the Triton interpreter")
    x = features(batch, dim, dtype, device)
    upstream = torch.randn(batch, batch, device=device)
    s = x.clone().requires_grad_(True)
    a = kdops.affinity(s, kind, backend=backend)
    (a * upstream.to(a.dtype)).sum().backward()
    s64 = x.double().requires_grad_(True)
    ref = reference.affinity(s64, kind)
    (ref * upstream.double()).sum().backward()
    assert a.shape == (batch, batch) and a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_max(a, ref, RELATION_LOSS_TOL[dtype])
    grad_size = float((ref.detach().abs() * upstream.abs()).sum()) / float(x.abs().max())
    assert_close_to_max(s.grad, s64.grad, RELATION_GRAD_TOL[dtype], floor=grad_size)
    if kind in ("euclidean", "squared_euclidean"):
        assert (a.diagonal() == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}")
def test_loss_matches_reference(backend, name, case):
    batch, d_s, d_t, dtype = case
    device = require(backend, dtype, "affinity")
    batch = max(batch, LOSSES[name][2])
    if batch > 65 and interpreted(backend):
        pytest.skip("slow in the Triton interpreter")
    check_loss(name, backend, features(batch, d_s, dtype, device), features(batch, d_t, dtype, device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle"])
@pytest.mark.parametrize("beta", [0.0, 0.25, 3.0])
def test_smooth_l1_beta(backend, name, beta):
    device = require(backend, torch.float64, "affinity")
    check_loss(name, backend, features(9, 6, torch.float64, device), features(9, 4, torch.float64, device),
               smooth_l1_beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_identical_student_and_teacher_give_zero(backend, name):
    device = require(backend)
    x = features(11, 13, torch.float32, device).requires_grad_(True)
    loss = LOSSES[name][0](x, x.detach().clone(), backend=backend)
    loss.backward()
    # exactly 0 but on a GPU, where the two models' equal terms need not round alike (fused
    # multiply-adds): 3.4e-16 for RKD-D, 4.9e-17 for SP on an H200 (Triton 3.6)
    assert abs(loss.item()) <= 1e-12 and float(x.grad.abs().max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicate_samples(backend, name, dtype):
    """Repeated samples: finite gradients (the clamp / zero direction), as the reference. In
    float32 the Gram form ``n_i + n_j - 2 x_i.x_j`` leaves a rounding residue ~ eps * n_i for a
    duplicate pair's squared distance, so RKD-D is looser there (RKD-A uses exact differences)."""
    device = require(backend, dtype, "affinity")
    f_s, f_t = features(9, 33, dtype, device), features(9, 7, dtype, device)
    f_s[4] = f_s[1]
    f_s[7] = f_s[1]
    f_t[4] = f_t[1]
    loose = (1e-3, 1e-3) if dtype == torch.float32 and name == "rkd_distance" else None
    _, grad = check_loss(name, backend, f_s, f_t, loss_tol=loose, tol=loose)
    assert grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_affinity_duplicates_and_zero_rows(backend, kind):
    device = require(backend, torch.float64, "affinity")
    x = features(6, 5, torch.float64, device)
    x[3] = x[0]
    x[5] = 0.0
    s = x.clone().requires_grad_(True)
    kdops.affinity(s, kind, backend=backend).sum().backward()  # sum(): an expanded (stride 0) gradient
    s64 = x.clone().requires_grad_(True)
    reference.affinity(s64, kind).sum().backward()
    assert s.grad.isfinite().all()
    assert_close_to_max(s.grad, s64.grad, RELATION_GRAD_TOL[torch.float64])


def test_chunked_backward(monkeypatch):
    """Pair weights in several row chunks (forced small) give the same gradient."""
    require("triton")
    from kdops.backends.triton import affinity as kernels

    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 1)
    assert kernels._chunk_rows(150, 5) == kernels.BLOCK < 150
    for name in ("sp", "rkd_distance"):
        check_loss(name, "triton", features(150, 5, torch.float64, "cpu"), features(150, 3, torch.float64, "cpu"))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("what", KINDS + list(LOSSES))
def test_gradcheck_float64(backend, what):
    device = require(backend, torch.float64, "affinity")
    f_s = features(5, 3, torch.float64, device).requires_grad_(True)
    f_t = features(5, 4, torch.float64, device)
    if what in KINDS:
        fn = lambda s: kdops.affinity(s, what, backend=backend)  # noqa: E731
    else:
        fn = lambda s: LOSSES[what][0](s, f_t, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f_s,), eps=1e-6, atol=1e-7, fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_values(backend):
    """By hand: the collinear points 0, 1, 3 (student) and 0, 2, 3 (teacher)."""
    device = require(backend, torch.float64, "affinity")
    s = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64, device=device)
    t = torch.tensor([[0.0], [2.0], [3.0]], dtype=torch.float64, device=device)
    distances = torch.tensor([[0.0, 1, 3], [1, 0, 2], [3, 2, 0]], dtype=torch.float64, device=device)
    torch.testing.assert_close(kdops.affinity(s, "euclidean", backend=backend), distances, rtol=0, atol=1e-15)
    # pairs (01, 02, 12): d_s / mu_s = (1, 3, 2) / 2, d_t / mu_t = (2, 3, 1) / 2, so |z| = 1/2, 0, 1/2
    # and h = 1/8, 0, 1/8 per ordered pair: 2 * 1/4 / 6
    assert abs(kdops.rkd_distance_loss(s, t, backend=backend).item() - 1 / 12) < 1e-15
    # the same order on the line: every angle is 0 or 180 degrees in both
    assert kdops.rkd_angle_loss(s, t, backend=backend).item() == 0


def test_matches_original_formulations():
    """The authors' formulations (SP: Tung & Mori's code; RKD: Park et al.'s code, which takes
    the mean over all B^2 pairs, diagonal included, and normalises directions with F.normalize)."""
    f_s, f_t = torch.randn(10, 4, 3, dtype=torch.float64), torch.randn(10, 7, dtype=torch.float64)
    s, t = f_s.view(10, -1), f_t
    bsz = 10
    g_s = F.normalize(torch.mm(s, s.t()))
    g_t = F.normalize(torch.mm(t, t.t()))
    sp = ((g_t - g_s) * (g_t - g_s)).view(-1, 1).sum(0) / (bsz * bsz)
    torch.testing.assert_close(kdops.similarity_preserving_loss(f_s, f_t, backend="torch"), sp[0])

    def pdist(e, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    t_d = pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(s)
    d = d / d[d > 0].mean()
    rkd_d = F.smooth_l1_loss(d, t_d, reduction="mean")
    torch.testing.assert_close(kdops.rkd_distance_loss(f_s, f_t, backend="torch") * 90 / 100, rkd_d)

    def angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)

    rkd_a = F.smooth_l1_loss(angles(s), angles(t), reduction="mean")
    torch.testing.assert_close(kdops.rkd_angle_loss(f_s, f_t, backend="torch"), rkd_a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_maps_and_non_contiguous_inputs(backend):
    """(B, C, H, W) features flattened per sample, permuted and strided inputs."""
    device = require(backend, torch.float64, "affinity")
    f_s = torch.randn(5, 6, 3, 2, device=device, dtype=torch.float64).permute(0, 3, 1, 2)  # (5, 2, 6, 3)
    f_t = torch.randn(9, 5, device=device, dtype=torch.float64).t()[:, ::2]  # (5, 5) strided
    for name in LOSSES:
        check_loss(name, backend, f_s, f_t)
    check_loss("sp", backend, torch.randn(4, device=device, dtype=torch.float64), torch.randn(4, 1, device=device,
                                                                                                  dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_batches(backend):
    device = require(backend)
    x = torch.randn(1, 5, device=device, requires_grad=True)
    loss = kdops.similarity_preserving_loss(x, torch.randn(1, 3, device=device), backend=backend)
    loss.backward()
    assert loss.item() < 1e-12 and x.grad.abs().max() < 1e-6  # one sample: both normalised Grams are [1]
    empty = kdops.affinity(torch.randn(0, 4, device=device), "cosine", backend=backend)
    assert empty.shape == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_teacher_gets_no_gradient_and_no_grad_calls(backend, name):
    device = require(backend)
    f_s = features(6, 5, torch.float32, device).requires_grad_(True)
    f_t = features(6, 3, torch.float32, device).requires_grad_(True)
    LOSSES[name][0](f_s, f_t, backend=backend).backward()
    assert f_t.grad is None and f_s.grad is not None
    with torch.no_grad():
        loss = LOSSES[name][0](f_s, f_t, backend=backend)
    assert_close_to_max(loss, LOSSES[name][1](f_s.double(), f_t.double()), RELATION_LOSS_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["affinity", "affinity_backward", "relation_loss", "relation_loss_backward"])
def test_opcheck(op, backend):
    """The custom ops (the forward ones with inputs that require grad: their autograd too)."""
    device = require(backend)
    x, y = torch.randn(7, 5, requires_grad=True, device=device), torch.randn(7, 3, device=device)
    if op.startswith("affinity"):
        calls = [(x, kind, backend) for kind in range(len(KINDS))]
        if op == "affinity_backward":
            calls = [(torch.randn(7, 7, device=device), x.detach(), ops.affinity_op(*c).detach(), c[1], backend)
                     for c in calls]
    else:
        calls = [(x, y, loss, 0.5, backend) for loss in (ops.SP, ops.RKD_DISTANCE, ops.RKD_ANGLE)]
        if op == "relation_loss_backward":
            calls = [(torch.tensor(1.5, device=device), x.detach(), y, ops.relation_loss_op(*c)[1], c[2], 0.5, backend)
                     for c in calls]
    for args in calls:
        torch.library.opcheck(getattr(torch.ops.kdops, op).default, args)


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    device = "cpu" if backend is None else require(backend)
    f_s, f_t = torch.randn(8, 2, 5, device=device), torch.randn(8, 6, device=device)

    def step(s, t):
        relations = (kdops.similarity_preserving_loss(s, t, backend=backend)
                     + kdops.rkd_distance_loss(s, t, backend=backend)
                     + 2 * kdops.rkd_angle_loss(s, t, smooth_l1_beta=0.5, backend=backend))
        return relations + kdops.affinity(s, "cosine", backend=backend).square().mean()

    # the interpreted Triton kernels sit inside custom ops, opaque to the compiler
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = f_s.clone().requires_grad_(True), f_s.clone().requires_grad_(True)
    eager, got = step(s1, f_t), compiled(s2, f_t)
    eager.backward()
    got.backward()
    assert_close_to_max(got, eager, RELATION_LOSS_TOL[torch.float32])
    assert_close_to_max(s2.grad, s1.grad, RELATION_GRAD_TOL[torch.float32])


def test_module_wrappers_match_functions():
    f_s, f_t = torch.randn(6, 8), torch.randn(6, 4)
    assert torch.equal(kdops.nn.SimilarityPreservingLoss()(f_s, f_t), kdops.similarity_preserving_loss(f_s, f_t))
    crit = kdops.nn.RKDLoss(distance_weight=25.0, angle_weight=50.0, smooth_l1_beta=0.5)
    assert "angle_weight=50.0" in repr(crit)
    expected = (25.0 * kdops.rkd_distance_loss(f_s, f_t, smooth_l1_beta=0.5)
                + 50.0 * kdops.rkd_angle_loss(f_s, f_t, smooth_l1_beta=0.5))
    torch.testing.assert_close(crit(f_s, f_t), expected)
    # a zero weight skips its term, so two samples (too few for angles) are fine without it
    two = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(kdops.nn.RKDLoss(angle_weight=0.0)(*two), kdops.rkd_distance_loss(*two))
    with pytest.raises(ValueError, match="distance_weight and angle_weight"):
        kdops.nn.RKDLoss(0.0, 0.0)


def test_kernel_table_and_codes():
    """triton, cpu and cuda declare kernels of this family; torch has none: it runs the reference."""
    from kdops import _dispatch
    from kdops.backends.triton import affinity as kernels

    assert all(ops.FAMILY in _dispatch.DECLARATIONS[b].families for b in ("triton", "cpu", "cuda"))
    with pytest.raises(LookupError, match="kdops.reference"):
        _dispatch.kernels(ops.FAMILY, "torch")
    for kind in KINDS:
        assert getattr(kernels, kind.upper()).value == ops.AFFINITY_KINDS.index(kind)
    assert (kernels.SP.value, kernels.RKD_DISTANCE.value, kernels.RKD_ANGLE.value) == (ops.SP, ops.RKD_DISTANCE,
                                                                                         ops.RKD_ANGLE)
    cpu = torch.device("cpu")
    assert ops.implementation("torch", cpu, torch.float32) == "torch"
    if kdops.available_backends()["triton"].available:
        assert ops.implementation("triton", cpu, torch.float32) == "triton"


def test_cpu_backend_runs_the_native_kernels(monkeypatch):
    """The automatic choice on CPU tensors is the native kdops._C kernels (not the reference)."""
    require("cpu")
    from kdops.backends.native import affinity as native_affinity

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert ops.implementation(None, cpu, dtype) == "cpu"
    calls = []
    monkeypatch.setattr(native_affinity, "call", lambda name, device, *args: calls.append(name))
    x = torch.randn(4, 3)
    kdops.affinity(x, "dot")
    kdops.similarity_preserving_loss(x.requires_grad_(True), torch.randn(4, 2)).backward()
    assert calls == ["affinity_forward", "relation_forward", "relation_backward"]


@pytest.mark.parametrize("batch", [130, 300, 520])  # 2, 3 and 5 row blocks of the CPU kernels' 128-row tiles
def test_cpu_tile_schedule(batch):
    """Every tile pair of the CPU kernels' round-robin schedule (even and odd block counts, with
    a partial last block) is computed once: affinities and losses match the reference."""
    require("cpu")
    f_s, f_t = features(batch, 5, torch.float64, "cpu"), features(batch, 3, torch.float64, "cpu")
    for kind in KINDS:
        s = f_s.clone().requires_grad_(True)
        upstream = torch.randn(batch, batch, dtype=torch.float64)
        (kdops.affinity(s, kind, backend="cpu") * upstream).sum().backward()
        s64 = f_s.clone().requires_grad_(True)
        (reference.affinity(s64, kind) * upstream).sum().backward()
        assert_close_to_max(s.grad, s64.grad, RELATION_GRAD_TOL[torch.float64])
    for name in ("sp", "rkd_distance"):
        check_loss(name, "cpu", f_s, f_t)


def _bad_calls():
    s, t = torch.randn(4, 6), torch.randn(4, 3)
    sp, rkd_d, rkd_a, aff = (kdops.similarity_preserving_loss, kdops.rkd_distance_loss, kdops.rkd_angle_loss,
                             kdops.affinity)
    return [
        (aff, (s.long(),), {}, TypeError, "x must be float32"),
        (aff, ([1.0],), {}, TypeError, "x must be a torch.Tensor"),
        (aff, (s,), dict(kind="manhattan"), ValueError, "kind must be one of"),
        (aff, (torch.tensor(1.0),), {}, ValueError, "x must have a batch dimension"),
        (aff, (torch.randn(3, 0),), {}, ValueError, "x must have at least one feature"),
        (aff, (s,), dict(backend="tpu"), ValueError, "backend"),
        (sp, (s, t.long()), {}, TypeError, "f_t must be float32"),
        (sp, (s.int(), t), {}, TypeError, "f_s must be float32"),
        (sp, (s, torch.randn(5, 3)), {}, ValueError, "f_t must have the batch size of f_s"),
        (sp, (s, t.double()), {}, TypeError, "f_t must have the dtype of f_s"),
        (sp, (s, torch.randn(4, 3, device="meta")), {}, ValueError, "f_t is on meta"),
        (sp, (torch.randn(0, 3), torch.randn(0, 3)), {}, ValueError, "at least 1 sample"),
        (rkd_d, (s[:1], t[:1]), {}, ValueError, "rkd_distance_loss needs a batch of at least 2"),
        (rkd_a, (s[:2], t[:2]), {}, ValueError, "rkd_angle_loss needs a batch of at least 3"),
        (rkd_d, (s, t), dict(smooth_l1_beta=-1.0), ValueError, "smooth_l1_beta"),
        (rkd_a, (s, t), dict(smooth_l1_beta=float("nan")), ValueError, "smooth_l1_beta"),
        (rkd_a, (s, t), dict(smooth_l1_beta="1"), TypeError, "smooth_l1_beta"),
        (rkd_d, (s, torch.randn(4, 2, 0)), {}, ValueError, "f_t must have at least one feature"),
        (rkd_d, (s, t), dict(backend="cuda"), RuntimeError, "backend='cuda'"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    fn, args, kwargs, error, text = _bad_calls()[case]
    if "backend='cuda'" in text and torch.cuda.is_available():
        pytest.skip("checks the error of a machine without a GPU")
    with pytest.raises(error, match=re.escape(text)):
        fn(*args, **kwargs)


# ---- near-duplicate samples (issue 16): exact distances in the native CPU and CUDA kernels ----
NATIVE = ["cpu", "cuda"]  # (cuda: on a GPU machine; skipped elsewhere)


def _close_features(case):
    """float32 features whose pairwise distances the Gram form |x_i|^2 + |x_j|^2 - 2 x_i.x_j
    cancels: 1-D samples (B = 257), tight clusters far from the origin or from the batch mean
    (whose centred rows are not exact), exact duplicates, pairs 1e-4 apart."""
    if case == "1d":
        return torch.randn(257, 1) + 3.0
    if case == "clustered":
        centres = torch.randn(5, 16) * 10
        return (50.0 + centres.repeat_interleave(26, 0) + 1e-3 * torch.randn(130, 16)).float()
    if case == "off-centre":  # clusters near 0 and near 64: x - mean(x) rounds at ulp(32), 3e-3 of the spread
        return torch.cat([0.01 + 1e-3 * torch.randn(20, 8), 64.0 + 1e-3 * torch.randn(20, 8)])
    y = torch.randn(40, 8) + 7.0
    if case == "near-duplicated":  # pairs 1e-4 apart
        return torch.cat([y, y[:20] + 1e-4 * torch.randn(20, 8)])
    return torch.cat([y, y[:20]])  # duplicated rows


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("case", ["1d", "clustered", "off-centre", "duplicated"])
@pytest.mark.parametrize("kind", ["euclidean", "squared_euclidean"])
def test_native_affinity_of_close_pairs_matches_float64(backend, kind, case):
    device = require(backend)
    x = _close_features(case).to(device)
    upstream = torch.randn(x.shape[0], x.shape[0], dtype=torch.float64, device=device)
    s = x.clone().requires_grad_(True)
    a = kdops.affinity(s, kind=kind, backend=backend)
    (a * upstream.float()).sum().backward()
    s64 = x.double().requires_grad_(True)
    a64 = reference.affinity(s64, kind)
    (a64 * upstream).sum().backward()
    assert_close_to_max(a, a64, RELATION_LOSS_TOL[torch.float32])
    assert_close_to_max(s.grad, s64.grad, RELATION_GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("case", ["1d", "clustered", "off-centre", "duplicated"])
def test_native_rkd_distance_of_close_pairs_matches_float64(backend, case):
    device = require(backend)
    x = _close_features(case).to(device)
    teacher = x[:, :1].repeat(1, 3) * 2.0 + 0.5 * torch.randn(x.shape[0], 3, device=device)
    check_loss("rkd_distance", backend, x, teacher)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("case", ["clustered", "off-centre", "near-duplicated"])
def test_native_rkd_angle_of_close_pairs_matches_float64(backend, case):
    """Triplets with a pair close to the anchor (a = E_pr << b = E_qr ~ c = E_pq), where the law of
    cosines' b - c cancels (gradient ~1e-4 of max|g| off before): cosines from the differences."""
    device = require(backend)
    x = _close_features(case).to(device)
    check_loss("rkd_angle", backend, x, torch.randn(x.shape[0], 3, device=device))


@pytest.mark.parametrize("backend", NATIVE)
def test_native_distances_ignore_a_common_shift(backend):
    """Distances do not see a shift of the batch (here 1000, where |x|^2 ~ 4e6 and float32's Gram
    form loses ~0.5 of every squared distance): the kernels centre it away."""
    device = require(backend)
    x = torch.randn(65, 4, device=device) + 1000.0
    for kind in ("euclidean", "squared_euclidean"):
        assert_close_to_max(kdops.affinity(x, kind=kind, backend=backend), reference.affinity(x.double(), kind),
                            RELATION_LOSS_TOL[torch.float32])


@pytest.mark.parametrize("what", ["affinity", "rkd_distance", "rkd_angle"])
def test_native_row_offsets_past_2_31(what):
    """Feature rows at i * stride > 2^31 elements (an untouched torch.empty buffer): the native
    kernels give the bits of compact rows, forward and backward."""
    require("cpu")
    stride, batch, dim = 2**30 + 3, 3, 5
    buf = torch.empty((batch - 1) * stride + dim, dtype=torch.bfloat16)
    x = buf.as_strided((batch, dim), (stride, 1))
    x.copy_(torch.randn(batch, dim).to(torch.bfloat16))
    teacher = torch.randn(batch, 4).to(torch.bfloat16)
    results = []
    for features in (x, x.clone()):
        s = features.detach().requires_grad_(True)  # as_strided views keep their strides
        if what == "affinity":
            value = kdops.affinity(s, kind="euclidean", backend="cpu").sum()
        else:
            value = LOSSES[what][0](s, teacher, backend="cpu")
        value.backward()
        results.append((value.detach(), s.grad))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2) and torch.equal(g1, g2) and v1.isfinite()
