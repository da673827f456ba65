"""Resource hygiene and error messages: 1000 calls of each op leave the process's resident memory
flat; the teacher cache leaves no file handle open; every bad call is a TypeError / ValueError
whose message names the argument (a table: keep it growing with the API)."""
import gc
import os

import pytest
import torch

import kdops
from kdops.cache import TeacherCache
from kdops.distributed import vocab_parallel_distill_loss

CALLS = 1000
WARMUP = 100
RSS_GROWTH_LIMIT_MIB = 4.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _logits(n=4, v=33, grad=True):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).requires_grad_(grad)
    return s, torch.randn(n, v, generator=g), torch.randint(0, v, (n,), generator=g)


def _op_steps():
    """op name -> one forward + backward step on small CPU inputs."""
    s, t, y = _logits()
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(33, 8, requires_grad=True)
    th, tw = torch.randn(4, 6), torch.randn(33, 6)
    lp, idx = torch.log_softmax(t, -1).topk(5, -1)
    f_s, f_t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 3)
    m_s, m_t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4)
    return {
        "distill_loss": lambda: kdops.distill_loss(s, t, y, hard_weight=0.2, divergence="jsd"),
        "distill_loss multi-teacher": lambda: kdops.distill_loss(s, torch.stack([t, t.flip(0)]), y),
        "fused_linear_distill_loss": lambda: kdops.fused_linear_distill_loss(h, w, th, tw, y, chunk_size=3),
        "sparse_distill_loss": lambda: kdops.sparse_distill_loss(s, lp, idx, y, rest_mass="bucket"),
        "fused_linear_sparse_distill_loss": lambda: kdops.fused_linear_sparse_distill_loss(h, w, lp, idx, y),
        "affinity": lambda: kdops.affinity(f_s, "euclidean").sum(),
        "similarity_preserving_loss": lambda: kdops.similarity_preserving_loss(f_s, f_t),
        "rkd_distance_loss": lambda: kdops.rkd_distance_loss(f_s, f_t),
        "rkd_angle_loss": lambda: kdops.rkd_angle_loss(f_s, f_t),
        "hint_loss": lambda: kdops.hint_loss(m_s, m_s.detach() + 1),
        "attention_transfer_loss": lambda: kdops.attention_transfer_loss(m_s, m_t),
        "vocab_parallel_distill_loss": lambda: vocab_parallel_distill_loss(s, t, y),
    }, (s, h, w, f_s, m_s)


@pytest.mark.parametrize("backend", ["cpu"])
def test_memory_stays_flat_over_1000_calls(backend, monkeypatch):
    """RSS after 1000 forward + backward steps of each op within a few MiB of its value after a
    warm-up (the allocator's caches filled), through kdops's custom ops and native kernels (the
    "torch" backend is the plain-PyTorch reference; the Triton interpreter is too slow for 1000
    calls)."""
    if not kdops.available_backends()[backend].available:
        pytest.skip(f"backend {backend!r} unavailable")
    monkeypatch.setenv("KDOPS_BACKEND", backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory, not speed: no OpenMP barriers on a shared machine
    try:
        _flat_memory(backend)
    finally:
        torch.set_num_threads(threads)


def _flat_memory(backend):
    steps, leaves = _op_steps()
    growth = {}
    for name, step in steps.items():
        for i in range(CALLS + WARMUP):
            if i == WARMUP:
                gc.collect()
                before = rss_mib()
            step().backward()
            for leaf in leaves:
                leaf.grad = None
        gc.collect()
        growth[name] = rss_mib() - before
    grown = {name: round(mib, 2) for name, mib in growth.items() if mib > RSS_GROWTH_LIMIT_MIB}
    assert not grown, f"RSS grew by more than {RSS_GROWTH_LIMIT_MIB} MiB over {CALLS} calls: {grown} (MiB)"


def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def test_cache_leaves_no_file_handle_open(tmp_path):
    before = _open_fds()
    logits = torch.randn(3, 4, 50)
    with TeacherCache(tmp_path, k=4, temperature=2.0, vocab_size=50, shard_tokens=4) as cache:
        cache.write([0, 1, 2], logits)
    for _ in range(CALLS):
        reader = TeacherCache(tmp_path)
        batch = reader.read([0, 2])
        assert batch.logprobs.shape == (8, 4)
        del reader, batch
    gc.collect()
    leaked = _open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                        if os.path.exists(f"/proc/self/fd/{fd}")}


# ------------------------------------------------------------------------------- error messages

S, T, Y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
H, W = torch.randn(4, 6), torch.randn(10, 6)
TH, TW = torch.randn(4, 3), torch.randn(10, 3)
LP, IDX = torch.log_softmax(T, -1).topk(3, -1)
F_S, F_T = torch.randn(5, 4), torch.randn(5, 2)
M_S, M_T = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)

# (call, exception type, substrings the message must hold: the argument's name, and a value or shape)
BAD_CALLS = {
    "student not a tensor": (lambda: kdops.distill_loss([1.0], T), TypeError, ["student_logits"]),
    "integer logits": (lambda: kdops.distill_loss(S.long(), T.long()), TypeError, ["student_logits", "int64"]),
    "scalar logits": (lambda: kdops.distill_loss(S[0, 0], T[0, 0]), ValueError, ["student_logits", "scalar"]),
    "teacher shape": (lambda: kdops.distill_loss(S, T[:, :5]), ValueError, ["teacher_logits", "(4, 5)"]),
    "teacher dtype": (lambda: kdops.distill_loss(S, T.double()), TypeError, ["teacher_logits", "float64"]),
    "empty vocabulary": (lambda: kdops.distill_loss(S[:, :0], T[:, :0]), ValueError, ["V >= 1"]),
    "labels shape": (lambda: kdops.distill_loss(S, T, Y[:3]), ValueError, ["labels", "(3,)"]),
    "float labels": (lambda: kdops.distill_loss(S, T, Y.float()), TypeError, ["labels", "float32"]),
    "label out of range": (lambda: kdops.distill_loss(S, T, Y + 10, hard_weight=0.5), ValueError,
                           ["labels", "[0, 10)"]),
    "temperature 0": (lambda: kdops.distill_loss(S, T, temperature=0.0), ValueError, ["temperature", "0.0"]),
    "temperature nan": (lambda: kdops.distill_loss(S, T, temperature=float("nan")), ValueError, ["temperature"]),
    "temperature str": (lambda: kdops.distill_loss(S, T, temperature="2"), TypeError, ["temperature", "str"]),
    "unknown divergence": (lambda: kdops.distill_loss(S, T, divergence="kl"), ValueError, ["divergence", "'kl'"]),
    "jsd beta 0": (lambda: kdops.distill_loss(S, T, divergence="jsd", beta=0.0), ValueError, ["beta", "jsd"]),
    "skew beta 1": (lambda: kdops.distill_loss(S, T, divergence="skew_forward_kl", beta=1.0), ValueError, ["beta"]),
    "hard_weight > 1": (lambda: kdops.distill_loss(S, T, Y, hard_weight=1.5), ValueError, ["hard_weight", "1.5"]),
    "hard_weight without labels": (lambda: kdops.distill_loss(S, T, hard_weight=0.5), ValueError, ["labels"]),
    "reduction": (lambda: kdops.distill_loss(S, T, reduction="avg"), ValueError, ["reduction", "'avg'"]),
    "backend name": (lambda: kdops.distill_loss(S, T, backend="gpu"), ValueError, ["backend", "'gpu'"]),
    "teacher_weights sum": (lambda: kdops.distill_loss(S, torch.stack([T, T]), teacher_weights=[0.5, 0.6]),
                            ValueError, ["teacher_weights", "sum"]),
    "teacher_weights count": (lambda: kdops.distill_loss(S, torch.stack([T, T]), teacher_weights=[1.0]),
                              ValueError, ["teacher_weights", "2"]),
    "teacher_weights one teacher": (lambda: kdops.distill_loss(S, T, teacher_weights=[1.0]), ValueError,
                                    ["teacher_weights"]),
    "negative teacher_weights": (lambda: kdops.distill_loss(S, torch.stack([T, T]), teacher_weights=[1.5, -0.5]),
                                 ValueError, ["teacher_weights", "-0.5"]),
    "fused weight shape": (lambda: kdops.fused_linear_distill_loss(H, W[:, :5], TH, TW), ValueError,
                           ["student_weight", "(10, 5)"]),
    "fused weight dtype": (lambda: kdops.fused_linear_distill_loss(H, W.double(), TH, TW), TypeError,
                           ["student_weight", "float64"]),
    "fused teacher vocabulary": (lambda: kdops.fused_linear_distill_loss(H, W, TH, TW[:7]), ValueError,
                                 ["teacher_weight", "7"]),
    "fused teacher rows": (lambda: kdops.fused_linear_distill_loss(H, W, TH[:3], TW), ValueError,
                           ["teacher_hidden", "(3,)"]),
    "fused bias shape": (lambda: kdops.fused_linear_distill_loss(H, W, TH, TW, student_bias=torch.zeros(9)),
                         ValueError, ["student_bias", "(9,)"]),
    "chunk_size 0": (lambda: kdops.fused_linear_distill_loss(H, W, TH, TW, chunk_size=0), ValueError,
                     ["chunk_size", "0"]),
    "fused teacher lists": (lambda: kdops.fused_linear_distill_loss(H, W, [TH, TH], [TW]), ValueError,
                            ["teacher_weight"]),
    "topk shape": (lambda: kdops.sparse_distill_loss(S, LP[:2], IDX[:2]), ValueError, ["topk_logprobs", "(2, 3)"]),
    "topk index dtype": (lambda: kdops.sparse_distill_loss(S, LP, IDX.float()), TypeError, ["topk_indices"]),
    "topk index range": (lambda: kdops.sparse_distill_loss(S, LP, IDX + 10), ValueError, ["topk_indices", "[0, 10)"]),
    "topk too many": (lambda: kdops.sparse_distill_loss(S, torch.zeros(4, 11), torch.zeros(4, 11, dtype=torch.long)),
                      ValueError, ["K = 11"]),
    "rest_mass": (lambda: kdops.sparse_distill_loss(S, LP, IDX, rest_mass="drop"), ValueError, ["rest_mass", "'drop'"]),
    "reverse kl ignoring rest": (lambda: kdops.sparse_distill_loss(S, LP, IDX, divergence="reverse_kl"), ValueError,
                                 ["rest_mass"]),
    "fused sparse weight": (lambda: kdops.fused_linear_sparse_distill_loss(H, W[:, :2], LP, IDX), ValueError,
                            ["student_weight"]),
    "affinity kind": (lambda: kdops.affinity(F_S, "manhattan"), ValueError, ["kind", "'manhattan'"]),
    "affinity scalar": (lambda: kdops.affinity(torch.tensor(1.0)), ValueError, ["x", "scalar"]),
    "affinity no features": (lambda: kdops.affinity(torch.randn(3, 0)), ValueError, ["x", "(3, 0)"]),
    "affinity ints": (lambda: kdops.affinity(F_S.long()), TypeError, ["x", "int64"]),
    "relation batch": (lambda: kdops.similarity_preserving_loss(F_S, F_T[:4]), ValueError, ["f_t", "(4, 2)"]),
    "relation dtype": (lambda: kdops.rkd_distance_loss(F_S, F_T.double()), TypeError, ["f_t", "float64"]),
    "rkd distance B = 1": (lambda: kdops.rkd_distance_loss(F_S[:1], F_T[:1]), ValueError, ["f_s", "2"]),
    "rkd angle B = 2": (lambda: kdops.rkd_angle_loss(F_S[:2], F_T[:2]), ValueError, ["f_s", "3"]),
    "smooth_l1_beta < 0": (lambda: kdops.rkd_angle_loss(F_S, F_T, smooth_l1_beta=-1.0), ValueError,
                           ["smooth_l1_beta", "-1.0"]),
    "smooth_l1_beta str": (lambda: kdops.rkd_distance_loss(F_S, F_T, smooth_l1_beta="1"), TypeError,
                           ["smooth_l1_beta"]),
    "hint shape": (lambda: kdops.hint_loss(M_S, M_T), ValueError, ["f_t", "(2, 5, 4, 4)"]),
    "hint adapter": (lambda: kdops.hint_loss(M_S, M_T, adapter=3), TypeError, ["adapter", "int"]),
    "at not a map": (lambda: kdops.attention_transfer_loss(F_S, F_T), ValueError, ["f_s", "(5, 4)"]),
    "at spatial": (lambda: kdops.attention_transfer_loss(M_S, M_T[:, :, :3]), ValueError, ["f_t", "spatial"]),
    "at p < 1": (lambda: kdops.attention_transfer_loss(M_S, M_T, p=0.5), ValueError, ["p", "0.5"]),
    "vocab parallel shapes": (lambda: vocab_parallel_distill_loss(S, T[:, :3]), ValueError, ["teacher_logits_shard"]),
    "vocab_start": (lambda: vocab_parallel_distill_loss(S, T, vocab_start=-1), ValueError, ["vocab_start", "-1"]),
    "nn temperature": (lambda: kdops.nn.DistillLoss(temperature=-1.0)(S, T), ValueError, ["temperature"]),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_error_names_the_argument(case):
    call, error, substrings = BAD_CALLS[case]
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [s for s in substrings if s not in message]
    assert not missing, f"{error.__name__} message {message!r} lacks {missing}"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_errors_are_the_same_on_every_backend(backend):
    """Validation runs before the dispatch: a named backend gets the same error."""
    if not kdops.available_backends()[backend].available:
        pytest.skip(f"backend {backend!r} unavailable")
    with pytest.raises(ValueError, match="temperature"):
        kdops.distill_loss(S, T, temperature=-1.0, backend=backend)
    with pytest.raises(ValueError, match="kind"):
        kdops.affinity(F_S, "manhattan", backend=backend)
    with pytest.raises(ValueError, match="topk_indices"):
        kdops.sparse_distill_loss(S, LP, IDX + 10, backend=backend)
