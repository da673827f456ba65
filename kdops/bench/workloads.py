"""The ops kdops.bench measures, their presets, inputs and the methods compared on each.

Every op is measured with the same set of methods:
  torch-eager      the loss the way it is written in plain PyTorch (the baseline of every ratio)
  torch-compile    ``torch.compile`` of :mod:`kdops.reference`'s function (``dynamic=False``)
  kdops-<backend>  the kdops loss on each selected backend
plus, per op, other libraries' losses where they are installed (import-guarded, GPU only):
  kd:            liger-kldiv    Liger-Kernel's LigerKLDIVLoss on log_softmax(s/T), log_softmax(t/T)
                 torchtune-fkl  torchtune's ForwardKLLoss on s/T, t/T (times T^2)
  sparse_kd:     (torch-eager: forward KL over the top-k renormalised, the usual way to write it)
  fused_linear:  kdops-unfused  logits materialised, then kdops.distill_loss
                 liger-jsd      Liger-Kernel's LigerFusedLinearJSD (beta 0.5: another divergence,
                                the same work)
                 torchtune-fkl  torchtune's ForwardKLWithChunkedOutputLoss on 8 logit chunks (T = 1)
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import kdops
from kdops import _dispatch, reference

Method = Callable[..., Tensor]
BASELINES: tuple[str, ...] = ("eager", "compile", "liger", "torchtune")
BASELINE = "torch-eager"  # the method every ratio is taken against


class Options(NamedTuple):
    """Settings shared by the methods of every op."""

    temperature: float
    backends: Optional[tuple[str, ...]]  # kdops backends; None: every one that runs natively here
    baselines: tuple[str, ...]  # subset of BASELINES (torch-eager always runs)
    compile_backend: str  # torch.compile's backend for torch-compile


class Workload(NamedTuple):
    """The inputs of one measurement: every method is called as ``fn(*inputs)``."""

    inputs: tuple[Tensor, ...]
    grad_argnums: tuple[int, ...]  # inputs that get gradients in forward+backward
    logits_bytes: Optional[int]  # bytes of the [N, V] logits, the unit of the "x logits" column


@dataclass(frozen=True)
class Op:
    name: str
    title: str
    dims: tuple[str, ...]  # names of a shape's sizes: "4096x32000" is N=4096, V=32000 for ("N", "V")
    default_shapes: dict[str, tuple[str, ...]]  # device type -> shapes
    make: Callable[[dict[str, int], torch.dtype, torch.device], Workload]
    methods: Callable[[torch.device, torch.dtype, Options], tuple[dict[str, Method], list[str]]]
    cpu_check: Optional[Callable[[list[dict]], list[str]]] = None  # CPU targets checked on this op's rows


def torch_eager_kd(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T^2``, batch mean, the way it is written in PyTorch."""
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature * temperature


def kdops_backends(device: torch.device, dtype: torch.dtype, options: Options) -> tuple[list[str], list[str]]:
    """The kdops backends to measure and notes on the ones skipped. Automatic choice: every
    kernel backend that runs on this device and dtype, except Triton's CPU interpreter (for
    tests, not timings); asked for by name, any backend that can run."""
    automatic = options.backends is None
    if automatic:
        candidates = ("triton", "cuda") if device.type == "cuda" else ("cpu", "triton")
    else:
        candidates = options.backends
    chosen, notes = [], []
    for name in candidates:
        why_not = _dispatch.why_not(name, device, dtype)
        if automatic and name == "triton" and device.type == "cpu":
            why_not = "the Triton interpreter is for tests, not timings; ask for it with --backends triton"
        if why_not is None:
            chosen.append(name)
        else:
            notes.append(f"kdops-{name}: skipped ({why_not})")
    return chosen, notes


def _add_external(found: dict[str, Method], notes: list[str], device: torch.device, options: Options,
                  baseline: str, module: str, method: str, build: Callable[[], Method]) -> None:
    """Adds another library's loss ``found[method] = build()`` where it can run; notes why not
    otherwise (not asked for, CPU, not installed, an API this code does not know)."""
    if baseline not in options.baselines:
        return
    if device.type != "cuda":
        notes.append(f"{method}: skipped (GPU only)")
    elif importlib.util.find_spec(module) is None:
        notes.append(f"{method}: skipped ({module} is not installed)")
    else:
        try:
            found[method] = build()
        except (ImportError, AttributeError, TypeError) as error:
            notes.append(f"{method}: skipped ({type(error).__name__}: {error})")


def _common(eager: Method, ref: Method, device: torch.device, dtype: torch.dtype, options: Options,
            kdops_fn: Callable[[str], Method]) -> tuple[dict[str, Method], list[str]]:
    """torch-eager, torch-compile of ``ref`` and ``kdops_fn(backend)`` for each backend."""
    found: dict[str, Method] = {BASELINE: eager}
    if "compile" in options.baselines:
        found["torch-compile"] = torch.compile(ref, dynamic=False, backend=options.compile_backend)
    backends, notes = kdops_backends(device, dtype, options)
    for name in backends:
        found[f"kdops-{name}"] = kdops_fn(name)
    return found, notes


# --------------------------------------------------------------------------- kd


def _kd_make(size: dict[str, int], dtype: torch.dtype, device: torch.device) -> Workload:
    s = torch.randn(size["N"], size["V"], device=device).mul_(3).to(dtype)
    t = torch.randn(size["N"], size["V"], device=device).mul_(3).to(dtype)
    return Workload((s, t), (0,), s.numel() * s.element_size())


def _kd_methods(device: torch.device, dtype: torch.dtype, options: Options) -> tuple[dict[str, Method], list[str]]:
    T = options.temperature
    found, notes = _common(
        lambda s, t: torch_eager_kd(s, t, T),
        lambda s, t: reference.distill_loss(s, t, temperature=T),
        device, dtype, options,
        lambda b: lambda s, t: kdops.distill_loss(s, t, temperature=T, backend=b),
    )

    def liger_kldiv() -> Method:
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t: kl(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T

    def torchtune_fkl() -> Method:
        from torchtune.modules.loss import ForwardKLLoss

        fkl = ForwardKLLoss()
        return lambda s, t: fkl(s / T, t / T, torch.zeros(s.shape[0], dtype=torch.long, device=s.device)) * T * T

    _add_external(found, notes, device, options, "liger", "liger_kernel", "liger-kldiv", liger_kldiv)
    _add_external(found, notes, device, options, "torchtune", "torchtune", "torchtune-fkl", torchtune_fkl)
    return found, notes


# --------------------------------------------------------------------------- fused_linear


def _fused_linear_make(size: dict[str, int], dtype: torch.dtype, device: torch.device) -> Workload:
    n, hidden, vocab = size["N"], size["H"], size["V"]

    def make(*shape: int) -> Tensor:
        return (torch.randn(*shape, device=device) / shape[-1] ** 0.5).to(dtype)

    h, w, th, tw = make(n, hidden), make(vocab, hidden), make(n, hidden), make(vocab, hidden)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    return Workload((h, w, th, tw, labels), (0, 1), n * vocab * h.element_size())


def _fused_linear_methods(device: torch.device, dtype: torch.dtype,
                          options: Options) -> tuple[dict[str, Method], list[str]]:
    T = options.temperature
    found, notes = _common(
        lambda h, w, th, tw, y: torch_eager_kd(F.linear(h, w), F.linear(th, tw), T),
        lambda h, w, th, tw, y: reference.fused_linear_distill_loss(h, w, th, tw, temperature=T),
        device, dtype, options,
        lambda b: lambda h, w, th, tw, y: kdops.fused_linear_distill_loss(h, w, th, tw, temperature=T, backend=b),
    )
    found["kdops-unfused"] = lambda h, w, th, tw, y: kdops.distill_loss(F.linear(h, w), F.linear(th, tw),
                                                                        temperature=T)

    def liger_jsd() -> Method:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=T)
        return lambda h, w, th, tw, y: jsd(h, w, th, tw)

    def torchtune_chunked_fkl(chunks: int = 8) -> Method:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        chunked = ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks)

        def loss(h: Tensor, w: Tensor, th: Tensor, tw: Tensor, y: Tensor) -> Tensor:
            s = [F.linear(c, w) for c in h.unsqueeze(0).tensor_split(chunks, dim=1)]
            with torch.no_grad():
                t = [F.linear(c, tw) for c in th.unsqueeze(0).tensor_split(chunks, dim=1)]
            return chunked(s, t, y.unsqueeze(0))

        return loss

    _add_external(found, notes, device, options, "liger", "liger_kernel", "liger-jsd", liger_jsd)
    _add_external(found, notes, device, options, "torchtune", "torchtune", "torchtune-fkl", torchtune_chunked_fkl)
    return found, notes


# The CPU target for kdops-cpu's fused linear against torch-eager (logits materialised).
FUSED_LINEAR_CPU_TARGET = {"peak": 1 / 8, "time": 1.3}


def _fused_linear_check(rows: list[dict]) -> list[str]:
    """The CPU target (peak <= 1/8 and forward+backward time <= 1.3x of torch-eager) per kdops-cpu row."""
    lines = []
    target = FUSED_LINEAR_CPU_TARGET
    for r in rows:
        if r["method"] == "kdops-cpu" and r.get("memory_ratio") is not None and r.get("speedup_fwd_bwd"):
            time_ratio = 1 / r["speedup_fwd_bwd"]
            ok = r["memory_ratio"] <= target["peak"] and time_ratio <= target["time"]
            lines.append(f"CPU target fused_linear {r['shape']} {r['dtype']}: peak {r['memory_ratio']:.3f} of "
                         f"torch-eager (<= {target['peak']:.3f}), time {time_ratio:.2f}x (<= {target['time']}x): "
                         f"{'met' if ok else 'NOT met'}")
    return lines


# --------------------------------------------------------------------------- sparse_kd


def torch_eager_sparse_kd(s: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, temperature: float) -> Tensor:
    """Forward KL from a cached top-k teacher renormalised over its K entries, ``* T^2``, batch
    mean, the way it is written in PyTorch: ``log_softmax(s/T)`` over V, gathered at the top-k."""
    lt = topk_logprobs.float().log_softmax(-1)
    ls = F.log_softmax(s.float() / temperature, -1).gather(-1, topk_indices.long())
    return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature * temperature


def _sparse_kd_make(size: dict[str, int], dtype: torch.dtype, device: torch.device) -> Workload:
    n, vocab, k = size["N"], size["V"], size["K"]
    if k > vocab:
        raise ValueError(f"sparse_kd shape NxVxK: K = {k} must be <= V = {vocab}")
    s = torch.randn(n, vocab, device=device).mul_(3).to(dtype)
    teacher = torch.randn(n, vocab, device=device).mul_(3)
    values, indices = teacher.log_softmax(-1).topk(k, dim=-1)  # log-probabilities at T = 1, as a cache holds
    del teacher
    return Workload((s, values.to(dtype), indices.to(torch.int32)), (0,), s.numel() * s.element_size())


def _sparse_kd_methods(device: torch.device, dtype: torch.dtype,
                       options: Options) -> tuple[dict[str, Method], list[str]]:
    T = options.temperature
    return _common(
        lambda s, v, i: torch_eager_sparse_kd(s, v, i, T),
        lambda s, v, i: reference.sparse_distill_loss(s, v, i, temperature=T),
        device, dtype, options,
        lambda b: lambda s, v, i: kdops.sparse_distill_loss(s, v, i, temperature=T, backend=b),
    )


# --------------------------------------------------------------------------- relation losses


def _features_make(size: dict[str, int], dtype: torch.dtype, device: torch.device) -> Workload:
    s = torch.randn(size["B"], size["D"], device=device).to(dtype)
    t = torch.randn(size["B"], size["D"], device=device).to(dtype)
    return Workload((s, t), (0,), None)


def _relation_methods(name: str) -> Callable[[torch.device, torch.dtype, Options],
                                             tuple[dict[str, Method], list[str]]]:
    """Methods of the relation loss ``name``; "kdops-<backend>:torch" says that the backend has no
    kernels of this family (:func:`kdops.ops.affinity.implementation`), so the reference ran."""
    from kdops.ops import affinity

    kdops_fn, ref_fn = getattr(kdops, name), getattr(reference, name)

    def methods(device: torch.device, dtype: torch.dtype, options: Options) -> tuple[dict[str, Method], list[str]]:
        found, notes = _common(ref_fn, ref_fn, device, dtype, options,
                               lambda b: lambda s, t: kdops_fn(s, t, backend=b))
        for key in [k for k in found if k.startswith("kdops-")]:
            backend = key.removeprefix("kdops-")
            impl = affinity.implementation(backend, device, dtype)
            if impl != backend:
                found[f"{key}:{impl}"] = found.pop(key)
        return found, notes

    return methods


_RELATION_SHAPES = {"cpu": ("8192x1024",), "cuda": tuple(f"{b}x{d}" for b in (256, 4096, 16384) for d in (128, 2048))}

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("kd", "kdops.distill_loss: fused temperature-softmax KD on [N, V] logits", ("N", "V"),
           {"cpu": ("4096x1000", "4096x32000", "1024x128256"), "cuda": ("4096x1000", "4096x32000", "4096x128256")},
           _kd_make, _kd_methods),
        Op("fused_linear", "kdops.fused_linear_distill_loss: lm-head GEMMs + KD without [N, V] logits",
           ("N", "H", "V"),
           {"cpu": ("4096x1024x32000",),
            "cuda": tuple(f"{n}x4096x{v}" for n in (4096, 16384) for v in (32000, 128256, 151936))},
           _fused_linear_make, _fused_linear_methods, _fused_linear_check),
        Op("sparse_kd", "kdops.sparse_distill_loss: KD from a cached top-k teacher on [N, V] student logits",
           ("N", "V", "K"), {"cpu": ("4096x32000x32", "1024x128256x64"),
                             "cuda": ("4096x32000x64", "4096x128256x64", "16384x128256x128")},
           _sparse_kd_make, _sparse_kd_methods),
        Op("sp", "kdops.similarity_preserving_loss on [B, D] features", ("B", "D"), _RELATION_SHAPES,
           _features_make, _relation_methods("similarity_preserving_loss")),
        Op("rkd_distance", "kdops.rkd_distance_loss on [B, D] features", ("B", "D"), _RELATION_SHAPES,
           _features_make, _relation_methods("rkd_distance_loss")),
        Op("rkd_angle", "kdops.rkd_angle_loss on [B, D] features (B^3 work; the reference holds B^3 terms)",
           ("B", "D"), {"cpu": ("512x128", "512x1024"),
                        "cuda": tuple(f"{b}x{d}" for b in (256, 1024, 4096) for d in (128, 2048))},
           _features_make, _relation_methods("rkd_angle_loss")),
    )
}

PRESETS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in OPS},
    "affinity": ("sp", "rkd_distance", "rkd_angle"),
    "all": tuple(OPS),
}
