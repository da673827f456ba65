"""kdops.distributed: vocabulary-parallel losses and data-parallel (DDP, FSDP2) usage.

Multi-process checks spawn one group of ``world`` processes per world size (gloo, loopback);
each child runs every case against a single-process reference computed from the full tensors
(same seed on every rank) and writes its failures to a file the parent reads.
"""
import json
import math
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import kdops
from kdops import distributed as kdist
from kdops import reference
from kdops.divergences import DIVERGENCES

from conftest import GRAD_TOL, LOSS_TOL, assert_close, beta_for, spawn_ranks

JOIN_TIMEOUT_S = 150  # the whole group; a collective that hangs fails after the gloo timeout below
COLLECTIVE_TIMEOUT_S = 60


def shard_sizes(vocab, world, uneven):
    """Contiguous vocabulary shards: as even as possible, or very uneven (an empty shard at 4)."""
    if not uneven:
        return [len(c) for c in torch.arange(vocab).tensor_split(world)]
    return {1: [vocab], 2: [1, vocab - 1], 4: [vocab - 12, 0, 11, 1]}[world]


def columns(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def backward(loss):
    (loss.sum() if loss.dim() else loss).backward()


def draw_logits(seed, lead, vocab, dtype, neg_inf=False, ignored=(1,), all_ignored=False):
    """Student / teacher logits and labels, identical on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*lead, vocab, generator=g) * 3).to(dtype)
    teacher = (torch.randn(*lead, vocab, generator=g) * 3).to(dtype)
    if neg_inf:
        teacher[..., ::3] = -math.inf
    labels = torch.randint(0, vocab, lead, generator=g)
    labels.view(-1)[list(ignored)] = -100
    if all_ignored:
        labels.fill_(-100)
    return student, teacher, labels


TRANSFORMS = ("student_logit_scale", "student_softcap", "teacher_logit_scale", "teacher_softcap")


def transformed(student, teacher, options):
    """The full logits after the logit transforms named in ``options`` (the reference's)."""
    return tuple(reference.transform_logits(x, options.get(f"{m}_logit_scale", 1.0), options.get(f"{m}_softcap"))
                 for x, m in ((student, "student"), (teacher, "teacher")))


def check_logits(rank, sizes, seed, lead=(6,), dtype=torch.float64, neg_inf=False, all_ignored=False,
                 pass_start=False, group=None, **options):
    """vocab_parallel_distill_loss on this rank's shard (``rank`` in ``group``) against the
    reference on the full logits."""
    student, teacher, labels = draw_logits(seed, lead, sum(sizes), dtype, neg_inf, all_ignored=all_ignored)
    cols = columns(sizes, rank)
    shard = student[..., cols].clone().requires_grad_(True)
    loss = kdist.vocab_parallel_distill_loss(shard, teacher[..., cols].contiguous(), labels,
                                             vocab_start=cols.start if pass_start else None, group=group,
                                             **options)
    if neg_inf and options.get("divergence") == "reverse_kl" and options.get("teacher_softcap") is None:
        # +inf, as the reference (test_kd); a softcap makes -inf logits -c: finite
        assert bool((loss == math.inf).all()), f"reverse_kl with -inf teacher logits: {loss}"
        return loss
    backward(loss)
    full = student.double().requires_grad_(True)
    ref = reference.distill_loss(*transformed(full, teacher.double(), options), labels,
                                 **{k: v for k, v in options.items() if k not in TRANSFORMS})
    backward(ref)
    what = f"sizes={sizes} dtype={dtype} neg_inf={neg_inf} options={options}"
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert shard.grad.dtype == dtype, what
    scale = float(ref.detach().abs().max()) if ref.numel() else 1.0
    try:
        assert_close(loss, ref, LOSS_TOL[dtype], scale=scale if math.isfinite(scale) else 1.0)
        assert_close(shard.grad, full.grad[..., cols], GRAD_TOL[dtype])
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None
    return loss


# ------------------------------------------------------------------------------- cases run in the children


def case_divergences(rank, world):
    """Every divergence, soft only and mixed with the hard label, every reduction, uneven shards."""
    reductions = ("mean", "sum", "none")
    for i, divergence in enumerate(DIVERGENCES):
        for j, hard_weight in enumerate((0.0, 0.25)):
            check_logits(rank, shard_sizes(37, world, uneven=bool(j)), seed=10 * i + j,
                         divergence=divergence, beta=beta_for(divergence), hard_weight=hard_weight,
                         reduction=reductions[(i + j) % 3], temperature=(2.0, 0.7)[j],
                         scale_by_temperature_squared=not j)


def case_masked_teacher_and_shapes(rank, world):
    """-inf teacher logits (reverse KL is then +inf, as in the reference), (B, T, V) logits,
    vocab_start passed instead of gathered."""
    for i, divergence in enumerate(DIVERGENCES):
        check_logits(rank, shard_sizes(23, world, uneven=False), seed=100 + i, neg_inf=True,
                     divergence=divergence, beta=beta_for(divergence), hard_weight=0.5)
    check_logits(rank, shard_sizes(41, world, uneven=True), seed=120, lead=(2, 3), reduction="none",
                 hard_weight=0.1, pass_start=True)


def case_dtypes(rank, world):
    """float32 / bfloat16 / float16 shards, computed in float32, gradients in the input dtype."""
    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        check_logits(rank, shard_sizes(53, world, uneven=bool(i % 2)), seed=200 + i, dtype=dtype,
                     divergence=DIVERGENCES[i], hard_weight=0.3)


def case_logit_transforms(rank, world):
    """Logit scales and softcaps (Gemma 2/3, Cohere, Granite), alone and together, every divergence,
    float64 / float32 / bfloat16 shards, -inf teacher logits (softcapped to -c, as the reference):
    the float64 reference on the transformed full logits."""
    transforms = (dict(student_logit_scale=0.6, teacher_logit_scale=1.7),
                  dict(student_softcap=2.5, teacher_softcap=4.0),
                  dict(student_logit_scale=1.4, student_softcap=3.0, teacher_logit_scale=0.8, teacher_softcap=2.0))
    for i, divergence in enumerate(DIVERGENCES):
        check_logits(rank, shard_sizes(37, world, uneven=bool(i % 2)), seed=700 + i, divergence=divergence,
                     beta=beta_for(divergence), hard_weight=(0.0, 0.3)[i % 2], temperature=(1.5, 0.8)[i % 2],
                     reduction=("mean", "sum", "none")[i % 3], **transforms[i % 3])
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        check_logits(rank, shard_sizes(45, world, uneven=bool(i)), seed=720 + i, dtype=dtype, hard_weight=0.2,
                     divergence="jsd", **transforms[2])
    check_logits(rank, shard_sizes(23, world, uneven=True), seed=730, neg_inf=True, divergence="reverse_kl",
                 hard_weight=0.1, **transforms[1])
    student, teacher, labels = draw_logits(740, (5,), 4 * world + 1, torch.float64)
    cols = columns(shard_sizes(4 * world + 1, world, uneven=False), rank)
    loss = kdist.vocab_parallel_distill_loss(student[:, cols], teacher[:, cols], labels, normalizer=7,
                                             **transforms[2])
    want = reference.distill_loss(*transformed(student, teacher, transforms[2]), labels, normalizer=7)
    assert_close(loss, want, LOSS_TOL[torch.float64])


def case_ignored_rows(rank, world):
    """All rows ignored: loss 0 (every reduction) and zero gradients."""
    for reduction in ("mean", "sum", "none"):
        loss = check_logits(rank, shard_sizes(19, world, uneven=True), seed=300, all_ignored=True,
                            hard_weight=0.5, reduction=reduction, divergence="jsd")
        assert bool((loss == 0).all()), f"all rows ignored, reduction={reduction}: loss {loss}"


def case_bad_input(rank, world):
    """Errors raised on every rank alike: rows that differ between ranks, labels out of range."""
    s = torch.randn(4 + rank, 5)
    try:
        kdist.vocab_parallel_distill_loss(s, s)
    except ValueError as e:
        assert "same rows" in str(e), e
    else:
        raise AssertionError("no error for different row counts over the ranks")
    labels = torch.tensor([0, 5 * world + 3, -100, 1])  # 5 * world + 3 >= V = 5 * world
    try:
        kdist.vocab_parallel_distill_loss(s[:4], s[:4], labels, hard_weight=0.5)
    except ValueError as e:
        assert "labels must lie in" in str(e), e
    else:
        raise AssertionError("no error for a label outside the vocabulary")
    try:  # a transform that differs between the ranks: every rank names it
        kdist.vocab_parallel_distill_loss(s[:4], s[:4], student_softcap=None if rank else 3.0)
    except ValueError as e:
        assert "student_softcap" in str(e), e
    else:
        raise AssertionError("no error for a softcap given on one rank only")


def case_fused_linear(rank, world):
    """vocab_parallel_fused_linear_distill_loss: value and gradients to the hidden states, the
    weight shard and the bias shard against the reference with the full lm_head weights; logit
    transforms, the student's entropy and a normalizer on every other divergence."""
    transforms = (dict(student_softcap=1.5, teacher_logit_scale=0.7),
                  dict(student_logit_scale=1.3, student_softcap=2.0, teacher_softcap=2.5))
    for i, divergence in enumerate(DIVERGENCES):
        sizes = shard_sizes(31, world, uneven=bool(i % 2))
        g = torch.Generator().manual_seed(400 + i)
        n, hs, ht, vocab = 9, 6, 5, sum(sizes)
        h = torch.randn(n, hs, generator=g, dtype=torch.float64)
        w = torch.randn(vocab, hs, generator=g, dtype=torch.float64)
        b = torch.randn(vocab, generator=g, dtype=torch.float64)
        th = torch.randn(n, ht, generator=g, dtype=torch.float64)
        tw = torch.randn(vocab, ht, generator=g, dtype=torch.float64)
        tb = torch.randn(vocab, generator=g, dtype=torch.float64)
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[[1, 4]] = -100
        options = dict(divergence=divergence, beta=beta_for(divergence), hard_weight=(0.0, 0.3)[i % 2],
                       temperature=1.5, reduction=("mean", "sum", "none")[i % 3])
        if i % 2:
            options.update(transforms[i // 2 % 2], return_entropy=True)
            if options["reduction"] == "mean":
                options["normalizer"] = 5
        cols = columns(sizes, rank)
        mine = [x.clone().requires_grad_(True) for x in (h, w[cols], b[cols])]
        loss = kdist.vocab_parallel_fused_linear_distill_loss(
            mine[0], mine[1], th, tw[cols], labels, student_bias_shard=mine[2], teacher_bias_shard=tb[cols],
            chunk_size=4, **options)
        entropy = want_entropy = None
        if i % 2:
            (loss, entropy) = loss
        backward(loss)
        full = [x.clone().requires_grad_(True) for x in (h, w, b)]
        ref = reference.fused_linear_distill_loss(full[0], full[1], th, tw, labels, student_bias=full[2],
                                                  teacher_bias=tb, **options)
        if i % 2:
            (ref, want_entropy) = ref
        backward(ref)
        try:
            assert_close(loss, ref, LOSS_TOL[torch.float64])
            if entropy is not None:
                assert not entropy.requires_grad
                assert_close(entropy, want_entropy, LOSS_TOL[torch.float64])
            for got, want in zip((x.grad for x in mine), (full[0].grad, full[1].grad[cols], full[2].grad[cols])):
                assert_close(got, want, GRAD_TOL[torch.float64])
        except AssertionError as e:
            raise AssertionError(f"sizes={sizes} options={options}: {e}") from None


def case_subgroups(rank, world):
    """Two process groups of world / 2 ranks (one rank each at world 2), each vocabulary-parallel
    over its own data: the ``group`` argument."""
    half = world // 2
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]  # on every rank
    mine = rank // half
    for i, divergence in enumerate(("jsd", "skew_reverse_kl")):
        check_logits(rank % half, shard_sizes(29, half, uneven=bool(i)), seed=600 + 10 * mine + i,
                     group=groups[mine], divergence=divergence, beta=0.3, hard_weight=0.2)


def _student(vocab):
    """Trunk [0:2] and lm_head [2]; the same initial weights on every rank and for the reference."""
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, vocab)).double()


def _data_parallel_batch(world, per_rank, vocab):
    """A global batch; rank 1's rows are all ignored."""
    g = torch.Generator().manual_seed(500)
    x = torch.randn(world * per_rank, 8, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(world * per_rank, 10, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (world * per_rank,), generator=g)
    labels[per_rank:2 * per_rank] = -100
    labels[0] = -100
    return x, teacher_hidden, teacher_weight, labels


def _check_grads(model, reference_model, what, get=lambda p: p.grad):
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        try:
            assert_close(get(p), q.grad, (1e-9, 1e-12))
        except AssertionError as e:
            raise AssertionError(f"{what}, parameter {name}: {e}") from None


def case_ddp(rank, world):
    """DistributedDataParallel student, kdops.distill_loss and kdops.fused_linear_distill_loss on
    each rank's rows with reduction="sum" * world / global_row_count: the gradients of
    single-process training on the concatenated batch with reduction="mean"."""
    from torch.nn.parallel import DistributedDataParallel

    per_rank, vocab = 3, 29
    x, th, tw, labels = _data_parallel_batch(world, per_rank, vocab)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    teacher_logits = th @ tw.T
    options = dict(hard_weight=0.2, temperature=2.0)

    model, single = _student(vocab), _student(vocab)
    ddp = DistributedDataParallel(model)
    loss = kdops.distill_loss(ddp(x[mine]), teacher_logits[mine], labels[mine], reduction="sum", **options)
    (loss * world / kdist.global_row_count(labels[mine])).backward()
    kdops.distill_loss(single(x), teacher_logits, labels, **options).backward()
    _check_grads(model, single, "DDP + distill_loss")

    trunk, single = _student(vocab), _student(vocab)
    ddp = DistributedDataParallel(trunk[:2])  # the lm_head is used outside forward, by the fused loss
    head = trunk[2]
    loss = kdops.fused_linear_distill_loss(ddp(x[mine]), head.weight, th[mine], tw, labels[mine],
                                           student_bias=head.bias, reduction="sum", **options)
    (loss * world / kdist.global_row_count(labels[mine])).backward()
    for p in head.parameters():  # not wrapped by DDP: average its gradient as DDP would
        dist.all_reduce(p.grad)
        p.grad /= world
    kdops.fused_linear_distill_loss(single[:2](x), single[2].weight, th, tw, labels,
                                    student_bias=single[2].bias, **options).backward()
    _check_grads(trunk, single, "DDP + fused_linear_distill_loss")


def case_fsdp2(rank, world):
    """FSDP2 fully_shard student (CPU, gloo): the same gradients as single-process training."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        return f"FSDP2 fully_shard is not importable here: {e}"
    per_rank, vocab = 3, 29
    x, th, tw, labels = _data_parallel_batch(world, per_rank, vocab)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    teacher_logits = th @ tw.T
    model, single = _student(vocab), _student(vocab)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        logits = model(x[mine])
    except Exception as e:  # noqa: BLE001 - any failure to set FSDP2 up on CPU is a skip reason
        return f"FSDP2 fully_shard does not run on CPU/gloo with torch {torch.__version__}: {type(e).__name__}: {e}"
    loss = kdops.distill_loss(logits, teacher_logits[mine], labels[mine], reduction="sum", hard_weight=0.2)
    (loss * world / kdist.global_row_count(labels[mine])).backward()
    kdops.distill_loss(single(x), teacher_logits, labels, hard_weight=0.2).backward()
    _check_grads(model, single, "FSDP2 + distill_loss", get=lambda p: p.grad.full_tensor())
    return None


CASES = {
    "divergences": case_divergences,
    "masked_teacher_and_shapes": case_masked_teacher_and_shapes,
    "dtypes": case_dtypes,
    "logit_transforms": case_logit_transforms,
    "ignored_rows": case_ignored_rows,
    "bad_input": case_bad_input,
    "fused_linear": case_fused_linear,
    "subgroups": case_subgroups,
    "ddp": case_ddp,
    "fsdp2": case_fsdp2,
}


def _worker(rank, world, port, out_dir):
    """One rank: every case; writes {case: None | "FAIL: ..." | "SKIP: ..."} to rank<r>.json."""
    results = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for name, case in CASES.items():
            try:
                skipped = case(rank, world)
                results[name] = None if skipped is None else f"SKIP: {skipped}"
            except Exception:  # noqa: BLE001 - reported to the parent
                results[name] = f"FAIL (rank {rank}): {traceback.format_exc()}"
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["setup"] = f"FAIL (rank {rank}): {traceback.format_exc()}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def spawned(request, tmp_path_factory):
    """Runs every case on ``world`` gloo ranks once; {case: [per-rank results]}."""
    world = request.param
    seen = spawn_ranks(_worker, world, tmp_path_factory.mktemp(f"world{world}"), join_timeout_s=JOIN_TIMEOUT_S,
                       must_report=range(world))
    per_rank = [seen[r] for r in range(world)]
    assert "setup" not in per_rank[0], per_rank[0]["setup"]
    return {name: [results.get(name, "FAIL: not run") for results in per_rank] for name in CASES}


@pytest.mark.parametrize("case", [c for c in CASES if c != "fsdp2"])
def test_multi_process(spawned, case):
    failures = [r for r in spawned[case] if r is not None]
    assert not failures, "\n".join(failures)


def test_fsdp2(spawned):
    results = spawned["fsdp2"]
    failures = [r for r in results if r is not None and r.startswith("FAIL")]
    assert not failures, "\n".join(failures)
    if results[0] is not None:
        pytest.skip(results[0][len("SKIP: "):])


# ------------------------------------------------------------------------------- one process, no group


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_without_process_group_equals_distill_loss(divergence):
    """No process group: the full vocabulary on one rank, the loss of kdops.distill_loss."""
    assert not dist.is_initialized()
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_logits(0, [43], seed=1, dtype=dtype, neg_inf=divergence == "forward_kl", divergence=divergence,
                     beta=beta_for(divergence), hard_weight=0.4)
    student, teacher, labels = draw_logits(2, (5,), 30, torch.float32)
    options = dict(divergence=divergence, beta=beta_for(divergence), hard_weight=0.25, reduction="none")
    got = kdist.vocab_parallel_distill_loss(student, teacher, labels, **options)
    assert_close(got, kdops.distill_loss(student, teacher, labels, **options), LOSS_TOL[torch.float32])


def test_fused_linear_without_process_group():
    g = torch.Generator().manual_seed(3)
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((2, 5, 7), (33, 7), (33,)))
    th = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    tw = torch.randn(33, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 33, (2, 5), generator=g)
    labels[0, 1] = -100
    for reduction in ("mean", "none"):
        got = kdist.vocab_parallel_fused_linear_distill_loss(h, w, th, tw, labels, student_bias_shard=b,
                                                             hard_weight=0.3, reduction=reduction, chunk_size=3)
        grads = torch.autograd.grad(got.sum(), (h, w, b))
        want = reference.fused_linear_distill_loss(h, w, th, tw, labels, student_bias=b, hard_weight=0.3,
                                                   reduction=reduction)
        for x, y in zip((got, *grads), (want, *torch.autograd.grad(want.sum(), (h, w, b)))):
            assert_close(x, y, GRAD_TOL[torch.float64])


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_gradcheck_float64(divergence):
    student, teacher, labels = draw_logits(4, (3,), 7, torch.float64)
    student.requires_grad_(True)
    options = dict(divergence=divergence, beta=0.3, hard_weight=0.3, temperature=1.5, reduction="sum",
                   student_logit_scale=0.8, student_softcap=2.5, teacher_softcap=3.0)
    assert torch.autograd.gradcheck(
        lambda s: kdist.vocab_parallel_distill_loss(s, teacher, labels, **options), (student,))
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(3, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda h, w: kdist.vocab_parallel_fused_linear_distill_loss(
            h, w, th, tw, labels, divergence=divergence, beta=0.3, hard_weight=0.3, reduction=reduction,
            chunk_size=2, student_logit_scale=1.3, student_softcap=2.0, teacher_logit_scale=0.6), (h, w))


def test_global_row_count_without_process_group():
    labels = torch.tensor([3, -100, 1, -100])
    assert kdist.global_row_count(labels).item() == 2
    assert kdist.global_row_count(torch.full((3,), -100)).item() == 1  # at least 1
    assert kdist.global_row_count(torch.zeros(5)).item() == 5  # no labels: every row counts


@pytest.mark.parametrize("case", [
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 4)), ValueError,
     "teacher_logits_shard"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3).double()), TypeError, "dtype"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(3).long()),
     ValueError, "labels"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3), vocab_start=-1),
     ValueError, "vocab_start"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3), divergence="kl"),
     ValueError, "divergence"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 3]),
                                               hard_weight=0.5), ValueError, "labels must lie in"),
    (lambda: kdist.vocab_parallel_fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 4), torch.randn(2, 3),
                                                            torch.randn(5, 3)), ValueError, "student_weight_shard"),
    (lambda: kdist.vocab_parallel_fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3),
                                                            torch.randn(6, 3)), ValueError, "teacher_weight_shard"),
    (lambda: kdist.vocab_parallel_fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3),
                                                            torch.randn(5, 3), chunk_size=0), ValueError, "chunk_size"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3), student_softcap=0.0),
     ValueError, "student_softcap"),
    (lambda: kdist.vocab_parallel_distill_loss(torch.randn(2, 3), torch.randn(2, 3), teacher_logit_scale="2"),
     TypeError, "teacher_logit_scale"),
    (lambda: kdist.vocab_parallel_fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3),
                                                            torch.randn(5, 3), teacher_softcap=-1.0),
     ValueError, "teacher_softcap"),
    (lambda: kdist.vocab_parallel_fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3),
                                                            torch.randn(5, 3), reduction="sum", normalizer=4),
     ValueError, "normalizer"),
    (lambda: kdist.vocab_parallel_fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3),
                                                            torch.randn(5, 3), return_entropy=1),
     TypeError, "return_entropy"),
], ids=lambda c: c[2])
def test_bad_input_names_the_argument(case):
    fn, error, match = case
    with pytest.raises(error, match=match):
        fn()


def test_no_grad_call():
    student, teacher, labels = draw_logits(5, (4,), 11, torch.float32)
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(11, 3, requires_grad=True)
    with torch.no_grad():
        loss = kdist.vocab_parallel_distill_loss(student.requires_grad_(True), teacher, labels, hard_weight=0.2)
        fused = kdist.vocab_parallel_fused_linear_distill_loss(h, w, h, w.flip(0), labels)
    assert not loss.requires_grad and not fused.requires_grad
    assert_close(loss, reference.distill_loss(student, teacher, labels, hard_weight=0.2), LOSS_TOL[torch.float32])
    assert_close(fused, reference.fused_linear_distill_loss(h, w, h, w.flip(0), labels), LOSS_TOL[torch.float32])
