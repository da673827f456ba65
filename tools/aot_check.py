"""Ahead-of-time check of every Triton kernel specialisation kdops launches, for real GPU targets,
without a GPU (issue 12, section 1).

1. Capture: the launchers of :mod:`kdops.backends.triton` run on ``meta`` tensors (no memory, no
   device) over the shape matrix below, with ``JITFunction.run`` replaced by a recorder; the
   recorded calls go through Triton's own binder (``create_function_from_signature`` and
   ``_pack_args``, as ``JITFunction.run`` does) to the signature, constexprs, attributes and
   options Triton would compile on a GPU. Nothing is hand-listed: a launcher change shows here.
2. Compile each distinct specialisation with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cc, 32))`` for sm_80, sm_90 and sm_100, in ``--jobs`` processes,
   with a fresh Triton cache (so that ptxas runs); read registers, spill stores / loads and the
   stack frame from Triton's bundled ``ptxas -v`` log, registers / local / stack / static shared
   memory from its bundled ``cuobjdump --dump-resource-usage``, and the dynamic shared memory
   from the kernel's metadata.
3. Fail on: a compile error; shared memory over the target's per-block limit; a grid over CUDA's
   limits; registers that let no CTA fit on an SM; spill stores or loads over ``SPILL_BUDGET``;
   two specialisations that compile to the same kernel (same TTIR and options: a launcher that
   passes one value two ways makes a GPU JIT-compile it twice).

Rows are cached between runs (``--cache``, default ``~/.cache/kdops/aot-rows``) under Triton's
own cache key of the compile (kernel and dependency sources, signature, constexprs, attributes,
options, target, ptxas and Triton versions): a re-run compiles only what changed, and the checks
run again on every row. ``--no-cache`` compiles everything. ``--shard I/N`` takes every N-th
specialisation (to split the matrix over machines, or to time a sample of it).

Recorded rows: ``--record FILE`` writes every row's key and resources (``make aot-rows``:
``benchmarks/results/aot-rows.json``, the committed full run); with ``--recorded FILE`` a row of
FILE stands for the compile of the same key, as a row of Triton's own cache stands for it on a
GPU (the checks still run on it), so that CI checks the whole matrix and compiles only the
kernels changed since (``--max-compiles N``: more than N such rows fail at once, before
compiling). ``--verify`` (every row), ``--verify-quick I/N`` (a sample of the quick subset's) and
``--verify-shard I/N`` (every N-th row in key order: CI rotates I with the commit count, so that
N consecutive commits compile every row again) compile recorded rows again from scratch and
fail where one differs from its record.

``--python PY`` runs the same check under another interpreter (another Triton: the Makefile
passes a Triton 3.6 virtual environment) in parallel with this one, and merges its rows. Output:
a table per kernel / arch / Triton version (then every failure) on stdout, all rows as JSON
(``--json``).

    python3 tools/aot_check.py                   # full matrix (make aot-check runs it for both Tritons)
    python3 tools/aot_check.py --recorded benchmarks/results/aot-rows.json --verify-shard 3/20  # as CI
    python3 tools/aot_check.py --quick           # the representative subset
    python3 tools/aot_check.py --shard 0/20 --no-cache   # a 1/20 sample, compiled from scratch
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

os.environ.pop("TRITON_INTERPRET", None)  # compile for GPUs: Triton reads it when kdops decorates kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (3.6 fuses too)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import get_cache_invalidating_env_vars  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.cache import get_cache_key  # noqa: E402

ARCHS = (80, 90, 100)

# Per compute capability: opt-in dynamic shared memory per block, shared memory per SM (bytes),
# 32-bit registers per SM, threads and CTAs per SM (CUDA C Programming Guide, compute capabilities).
ARCH_LIMITS = {
    80: dict(smem_block=166912, smem_sm=167936, regs_sm=65536, threads_sm=2048, ctas_sm=32),
    90: dict(smem_block=232448, smem_sm=233472, regs_sm=65536, threads_sm=2048, ctas_sm=32),
    100: dict(smem_block=232448, smem_sm=233472, regs_sm=65536, threads_sm=2048, ctas_sm=32),
}
GRID_LIMITS = (2**31 - 1, 65535, 65535)
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KB of shared memory per CTA (sm_80 and later)

# Spill budget, bytes per thread of spill stores and of spill loads. A spill of S bytes per thread
# costs the CTA S * threads bytes of local memory (L1-resident) per spill site; at 32 bytes (eight
# 32-bit values: a few loop-invariant scalars evicted once per loop) that is at most 1% of the
# logits bytes a row-kernel thread streams per vocabulary block (BLOCK_V * 4 B / 256 threads per
# warp group = 64 B per block for 4096-lane fp32 blocks, times the 3 passes), and no tile can hide
# in it: the spills issue 12 found were 80 B to 10 KB. Budget 0 would fail on ptxas' choices that
# change between CUDA releases without a change in kdops.
SPILL_BUDGET = 32


# ----------------------------------------------------------------------------- shape matrix


@dataclass
class Matrix:
    """The shapes each launcher is driven with (issue 12, section 1)."""

    dtypes: tuple = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    tokens: int = 8192
    vocabs: tuple = (32000, 128256, 151936, 262144)
    divergences: tuple = (0, 1, 2, 3, 4, 5)  # codes of kdops.divergences
    kd_divergences: tuple = (6,)  # the kd family's own codes (kdops._codes.KD_DIVERGENCES): DeiT's hard target
    teachers: tuple = (1, 2, 3, 4, 8, 16, 256)  # 256: the Triton kd family's KD_MAX_TEACHERS
    label_modes: tuple = ("none", "labels", "hard")  # no labels; labels (ignored rows), no CE; CE term
    grads: tuple = (False, True)
    sparse_k: tuple = (8, 64, 128)
    rest_buckets: tuple = (False, True)
    linear_hidden: tuple = (1024, 4096)
    linear_vocabs: tuple = (32000, 128256)
    linear_needs: tuple = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))
    linear_bias: tuple = (False, True)
    linear_row_weights: tuple = (False, True)
    float32_precisions: tuple = ("highest", "high")  # torch.set_float32_matmul_precision: ieee, tf32 dots
    batches: tuple = (256, 4096, 65536)
    features: tuple = (128, 2048)
    attention_heads: tuple = ((1, 12), (2048, 32))  # (B, H): B * H = 12; 65536, past a grid axis y or z
    attention_lengths: tuple = (512, 2048, 8192)
    attention_head_sizes: tuple = (32, 64, 128)  # student relation head size
    attention_teacher_sizes: tuple = (64, 128)
    attention_causal: tuple = (False, True)
    attention_masked: tuple = (False, True)
    attention_divergences: Optional[tuple] = None  # None: ``divergences``
    archs: tuple = ARCHS


def quick_matrix() -> Matrix:
    """The CI subset: each kernel at its heaviest variants (hard-label term, gradients, mixtures
    of 3, 16 and 256 teachers (16 float64 teachers spilled 632 B on sm_80 before their warps
    counted the tile; 256, the most the Triton kd family takes, its 16-lane rows), the JSD and
    forward-KL divergences, every pass and gradient of the fused linear kernel, every affinity
    kind and relation loss forward and backward) for 16-bit, float32 and float64 inputs, at one
    realistic shape each, on sm_80,
    sm_90 (the GPUs kdops is lent) and sm_100; the attention relation causal, masked and not, with
    skew reverse KL (its most registers in backward) and JSD (unmasked float32 forward at 32 rows:
    1004 B of spills), student head size 64 and 128, teacher 128 (float64 128 / 128 needed
    192-207 KB of shared memory on sm_80 before its pipeline stages were capped)."""
    return Matrix(dtypes=(torch.bfloat16, torch.float32, torch.float64), vocabs=(151936,), divergences=(0, 2),
                  teachers=(1, 3, 16, 256), label_modes=("hard",), grads=(True,), sparse_k=(64,),
                  rest_buckets=(True,), linear_hidden=(4096,), linear_vocabs=(128256,),
                  linear_needs=((True, True, True),), linear_bias=(True,), linear_row_weights=(False,),
                  float32_precisions=("highest",),
                  batches=(4096,), features=(2048,), attention_heads=((2048, 32),), attention_lengths=(2048,),
                  attention_head_sizes=(64, 128), attention_teacher_sizes=(128,), attention_causal=(True,),
                  attention_masked=(False, True), attention_divergences=(2, 4), archs=ARCHS)


# ----------------------------------------------------------------------------- capture


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``; ``case``: what the launcher was asked."""

    fn: Any
    grid: tuple
    args: tuple
    kwargs: dict
    case: str


@contextlib.contextmanager
def recording(into: list[Launch], case: Callable[[], str]) -> Iterator[None]:
    """Replace ``JITFunction.run`` (what ``kernel[grid](...)`` calls) by a recorder for the block."""
    original = triton_jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, tuple(grid), args, dict(kwargs), case()))

    triton_jit.JITFunction.run = record
    try:
        yield
    finally:
        triton_jit.JITFunction.run = original


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _options(divergence: int, hard: bool, rest_bucket: bool = False):
    """The options record of kdops' ops (``kdops.ops._common.DistillOptions``): T = 2, beta 0.5."""
    from kdops.ops._common import DistillOptions

    hard_weight = 0.5 if hard else 0.0
    return DistillOptions(divergence, 2.0, 0.5, hard_weight, (1.0 - hard_weight) * 4.0, -100, rest_bucket)


def _call(launcher: Callable, before: tuple, opts, after: tuple, sparse: bool = False):
    """``launcher(*before, opts, *after)``; launchers not (yet) taking the record get its fields."""
    if {"options", "opts"} & set(inspect.signature(launcher).parameters):
        return launcher(*before, opts, *after)
    scalars = tuple(opts)[:6] + ((opts.rest_bucket,) if sparse else ())
    return launcher(*before, *scalars, *after)


def _labels(mode: str, n: int) -> Optional[torch.Tensor]:
    return None if mode == "none" else meta(n, dtype=torch.int64)


def kd_cases(m: Matrix) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kdops.backends.triton.kd import kd_forward

    n = m.tokens
    for dtype in m.dtypes:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for vocab in m.vocabs:
            for k in m.teachers:
                teacher = meta(k, n, vocab, dtype=dtype) if k > 1 else meta(n, vocab, dtype=dtype)
                log_w = meta(k, dtype=acc) if k > 1 else None
                for div in m.divergences + m.kd_divergences:
                    for mode in m.label_modes:
                        for grad in m.grads:
                            opts = _options(div, mode == "hard")
                            yield (f"kd {dtype} N={n} V={vocab} K={k} div={div} labels={mode} grad={grad}",
                                   lambda t=teacher, w=log_w, o=opts, mo=mode, g=grad, v=vocab: _call(
                                       kd_forward, (meta(n, v, dtype=dtype), t, _labels(mo, n)), o, (g, w)))


def sparse_cases(m: Matrix) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kdops.backends.triton.sparse_kd import sparse_kd_forward

    n = m.tokens
    for dtype in m.dtypes:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for vocab in m.vocabs:
            for k in m.sparse_k:
                for bucket in m.rest_buckets:
                    for div in m.divergences:
                        for mode in m.label_modes:
                            for grad in m.grads:
                                opts = _options(div, mode == "hard", bucket)
                                yield (f"sparse {dtype} N={n} V={vocab} k={k} bucket={bucket} div={div} "
                                       f"labels={mode} grad={grad}",
                                       lambda v=vocab, k=k, o=opts, mo=mode, g=grad, a=acc: _call(
                                           sparse_kd_forward,
                                           (meta(n, v, dtype=dtype), meta(n, k, dtype=a), meta(n, k, dtype=torch.int32),
                                            _labels(mo, n)), o, (g,), sparse=True))


def fused_linear_cases(m: Matrix) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kdops.backends.triton import fused_linear

    n = m.tokens
    for dtype in (d for d in m.dtypes if d != torch.float64):  # fp64 takes the chunked path over kd
        precisions = m.float32_precisions if dtype == torch.float32 else ("highest",)
        for hidden in m.linear_hidden:
            for vocab in m.linear_vocabs:
                for bias in m.linear_bias:
                    for needs in m.linear_needs:
                        if needs[2] and not bias:
                            continue
                        for row_w in m.linear_row_weights if any(needs) else (False,):
                            for div in m.divergences:
                                for mode in m.label_modes:
                                    for precision in precisions:
                                        def run(h=hidden, v=vocab, b=bias, nd=needs, rw=row_w,
                                                o=_options(div, mode == "hard"), mo=mode, p=precision):
                                            bias_ = meta(v, dtype=dtype) if b else None
                                            torch.set_float32_matmul_precision(p)
                                            try:
                                                return _call(fused_linear.fused_linear_distill,
                                                             (meta(n, h, dtype=dtype), meta(v, h, dtype=dtype), bias_,
                                                              meta(n, h, dtype=dtype), meta(v, h, dtype=dtype), bias_,
                                                              _labels(mo, n),
                                                              meta(n, dtype=torch.float32) if rw else None),
                                                             o, (list(nd),))
                                            finally:
                                                torch.set_float32_matmul_precision("highest")

                                        yield (f"fused_linear {dtype} N={n} H={hidden} V={vocab} bias={bias} "
                                               f"needs={needs} row_weights={row_w} div={div} labels={mode} "
                                               f"matmul={precision}", run)


def affinity_cases(m: Matrix) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kdops.backends.triton import BACKEND, affinity

    for dtype in (d for d in m.dtypes if d in (BACKEND.families["affinity"].dtypes or BACKEND.dtypes)):  # this Triton's
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for b in m.batches:
            for d in m.features:
                for kind in (affinity.DOT, affinity.COSINE, affinity.EUCLIDEAN, affinity.SQUARED_EUCLIDEAN):
                    def run(b=b, d=d, kind=kind):
                        x = meta(b, d, dtype=dtype)
                        out = affinity.affinity_forward(x, kind)
                        affinity.affinity_backward(meta(b, b, dtype=acc), x, out, kind)

                    yield f"affinity {dtype} B={b} D={d} kind={kind} forward+backward", run
                for loss in (affinity.SP, affinity.RKD_DISTANCE, affinity.RKD_ANGLE):
                    def run(b=b, d=d, loss=loss):
                        s, t = meta(b, d, dtype=dtype), meta(b, d, dtype=dtype)
                        _, stats = affinity.relation_forward(s, t, loss, 1.0)
                        affinity.relation_backward(meta(dtype=acc), s, t, stats, loss, 1.0)

                    yield f"relation {dtype} B={b} D={d} loss={loss} forward+backward", run


def attention_relation_cases(m: Matrix) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kdops.backends.triton import BACKEND, attention_relation

    for dtype in (d for d in m.dtypes if d in (BACKEND.families["attention_relation"].dtypes or BACKEND.dtypes)):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for (b, h), length in ((bh, n) for bh in m.attention_heads for n in m.attention_lengths):
            for ds in m.attention_head_sizes:
                for dt in m.attention_teacher_sizes:
                    for div in m.attention_divergences or m.divergences:
                        for causal in m.attention_causal:
                            for masked in m.attention_masked:
                                def run(b=b, h=h, n=length, ds=ds, dt=dt, div=div, causal=causal, masked=masked):
                                    sa, sb = meta(b, h, n, ds, dtype=dtype), meta(b, h, n, ds, dtype=dtype)
                                    ta, tb = meta(b, h, n, dt, dtype=dtype), meta(b, h, n, dt, dtype=dtype)
                                    counted = meta(b, n, dtype=torch.uint8) if masked else None
                                    options = (causal, 2.0, div, 0.5)
                                    _, stats = attention_relation.relation_forward(sa, sb, ta, tb, counted, *options)
                                    attention_relation.relation_backward(meta(b, h, n, dtype=acc), sa, sb, ta, tb,
                                                                         counted, stats, *options)

                                yield (f"attention_relation {dtype} B={b} H={h} L={length} d={ds} d_teacher={dt} "
                                       f"div={div} causal={causal} mask={masked} forward+backward", run)


FAMILIES = {"kd": kd_cases, "sparse_kd": sparse_cases, "fused_linear": fused_linear_cases, "affinity": affinity_cases,
            "attention_relation": attention_relation_cases}


def capture(m: Matrix, families: tuple[str, ...] = tuple(FAMILIES)) -> list[Launch]:
    """Every launch the launchers make over the matrix (meta tensors, recorder in place)."""
    import torch.fx.experimental._config as fx_config

    launches: list[Launch] = []
    current = [""]
    with recording(launches, lambda: current[0]), \
            _setting(fx_config, "meta_nonzero_assume_all_nonzero", True), \
            _sm_count(132):
        for family in families:
            for case, run in FAMILIES[family](m):
                current[0] = case
                run()
    return launches


@contextlib.contextmanager
def _setting(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _sm_count(count: int) -> Iterator[None]:
    """The fused-linear launcher sizes its grid by the SM count of a CUDA device; meta tensors
    get that of an H100 / H200 (132), so that the captured grids are a GPU's."""
    from kdops.backends.triton import fused_linear

    with _setting(fused_linear, "_target_programs", lambda device: 2 * count):
        yield


# ----------------------------------------------------------------------------- specialise


@dataclass
class Spec:
    """A distinct specialisation: what Triton compiles for one launch."""

    fn: Any
    kwargs: dict
    args: tuple
    name: str
    summary: str
    cases: list[str] = field(default_factory=list)
    max_grid: list[int] = field(default_factory=lambda: [0, 0, 0])


def bind(launch_fn: Any, args: tuple, kwargs: dict, cc: int) -> tuple[Any, dict, dict, dict, Any]:
    """(target, signature, constexprs, attrs, options) of a launch for compute capability ``cc``,
    by Triton's own binder (what ``JITFunction.run`` computes before compiling)."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = triton_jit.create_function_from_signature(launch_fn.signature, launch_fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = launch_fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _name(fn: Any) -> str:
    return fn.fn.__name__


def specialisations(launches: list[Launch]) -> list[Spec]:
    """The distinct specialisations of ``launches`` (keyed as Triton keys its cache)."""
    specs: dict[str, Spec] = {}
    for launch in launches:
        _, signature, constexprs, attrs, options = bind(launch.fn, launch.args, launch.kwargs, 90)
        key = repr((_name(launch.fn), sorted(signature.items()), sorted(map(repr, constexprs.items())),
                    sorted(map(repr, attrs.items())), sorted(map(repr, options.__dict__.items()))))
        spec = specs.get(key)
        if spec is None:
            consts = {p.name: v for p, v in zip(launch.fn.params, _bound_values(launch)) if p.is_constexpr}
            tensors = sorted({sig for name, sig in signature.items() if str(sig).startswith("*")})
            summary = " ".join([f"{k}={_short(v)}" for k, v in consts.items()]
                               + [f"warps={options.num_warps}", f"stages={options.num_stages}",
                                  "ptrs=" + ",".join(tensors)])
            spec = specs[key] = Spec(launch.fn, launch.kwargs, launch.args, _name(launch.fn), summary)
        if len(spec.cases) < 3:
            spec.cases.append(launch.case)
        grid = list(launch.grid) + [1] * (3 - len(launch.grid))
        spec.max_grid = [max(a, b) for a, b in zip(spec.max_grid, grid)]
    return list(specs.values())


def _bound_values(launch: Launch) -> list[Any]:
    sig = launch.fn.signature
    bound = sig.bind(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    return list(bound.arguments.values())


def _short(v: Any) -> str:
    return str(v).replace("triton.language.", "").replace(" ", "")


# ----------------------------------------------------------------------------- redundancy


def _backend_options(src: ASTSource, target: Any, options: Any) -> tuple[Any, Any]:
    """The backend of ``target`` and the options it compiles ``src`` with (parsed as
    ``triton.compile`` parses them)."""
    backend = make_backend(target)
    return backend, backend.parse_options(dict(options.__dict__, **src.parse_options()))


def _fork_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """``jobs`` worker processes, forked: they inherit ``_SPECS`` (set before the pool starts)."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))


_LOCATION = re.compile(r"\s*loc\((?:#loc\d*|\"[^\"]*\"[^)]*)\)")


def ttir_digest(spec: Spec, cc: int = 90) -> str:
    """sha256 of what ``spec`` compiles from: its TTIR for sm_``cc`` (Triton's frontend and TTIR
    passes; locations and the kernel's name dropped) and its compile options. Every later stage
    is a function of these and the target, so two specialisations with one digest compile to the
    same kernel: Triton would JIT-compile (and cache) it twice on a GPU."""
    from triton._C.libtriton import ir

    target, signature, constexprs, attrs, options = bind(spec.fn, spec.args, spec.kwargs, cc)
    src = ASTSource(spec.fn, signature, constexprs, attrs)
    backend, parsed = _backend_options(src, target, options)
    stages: dict = {}
    backend.add_stages(stages, parsed, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, parsed, backend.get_codegen_implementation(parsed), backend.get_module_map(),
                         context)
    text = stages["ttir"](module, {"hash": "", "target": target, **parsed.__dict__}).str_nodebug()
    text = _LOCATION.sub("", text).replace(f"@{spec.name}", "@kernel")
    return hashlib.sha256(f"{text}\n{sorted(parsed.__dict__.items())!r}".encode()).hexdigest()


_SPECS: list[Spec] = []  # set before the worker processes fork


def _digest(index: int) -> str:
    return ttir_digest(_SPECS[index])


def redundant(specs: list[Spec], jobs: int) -> list[list[Spec]]:
    """The groups of specialisations that compile to the same kernel (:func:`ttir_digest`): a
    launcher passing one value two ways (``True`` and ``tl.constexpr(True)``, say) or a constexpr
    the kernel does not read in that case. Each group costs a GPU user a JIT compile per extra
    member; the launcher should pass one spelling."""
    global _SPECS
    _SPECS = specs
    with _fork_pool(jobs) as pool:
        digests = list(pool.map(_digest, range(len(specs)), chunksize=8))
    groups: dict[str, list[Spec]] = {}
    for spec, digest in zip(specs, digests):
        groups.setdefault(digest, []).append(spec)
    return [g for g in groups.values() if len(g) > 1]


# ----------------------------------------------------------------------------- compile and read


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes (per thread) from a ``ptxas -v`` log of one kernel."""
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    if not regs or not spill:
        raise ValueError(f"no register / spill lines in the ptxas log: {log[:400]!r}")
    stack, stores, loads = (max(int(s[i]) for s in spill) for i in range(3))
    return dict(regs=max(map(int, regs)), stack=stack, spill_stores=stores, spill_loads=loads)


def parse_resource_usage(text: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of a cubin with one kernel: REG, STACK, SHARED, LOCAL."""
    found = _CUOBJDUMP.findall(text)
    if not found:
        raise ValueError(f"no resource line in the cuobjdump output: {text[:400]!r}")
    reg, stack, shared, local = map(int, found[0])
    return dict(cuobjdump_regs=reg, cuobjdump_stack=stack, static_shared=shared, local=local)


def ctas_per_sm(cc: int, regs: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM (registers allocated per warp in units of 256, shared memory plus the
    1 KB the driver reserves per CTA); 0: the kernel cannot launch."""
    lim = ARCH_LIMITS[cc]
    threads = 32 * num_warps
    by_threads = lim["threads_sm"] // threads
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (lim["regs_sm"] // regs_per_warp) // num_warps
    by_smem = lim["smem_sm"] // (shared + SMEM_RESERVED_PER_CTA)
    return min(lim["ctas_sm"], by_threads, by_regs, by_smem)


def check(row: dict, cc: int, grid: list[int], budget: int) -> list[str]:
    """The failures of a compiled specialisation (empty: it passes)."""
    lim = ARCH_LIMITS[cc]
    errors = []
    if row["shared"] > lim["smem_block"]:
        errors.append(f"shared memory {row['shared']} B > {lim['smem_block']} B per block on sm_{cc}")
    for axis, (n, top) in enumerate(zip(grid, GRID_LIMITS)):
        if n > top:
            errors.append(f"grid[{axis}] = {n} > CUDA's {top}")
    if row["ctas_per_sm"] < 1:
        errors.append(f"no CTA fits an SM ({row['regs']} registers x {row['num_warps']} warps, "
                      f"{row['shared']} B shared memory)")
    if max(row["spill_stores"], row["spill_loads"]) > budget:
        errors.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads > budget {budget} B")
    return errors


_ROW_CACHE: Optional[Path] = None  # where compiled rows are kept between runs (None: no cache)
_RECORDED: dict[str, dict] = {}  # the rows of a committed full run (--recorded), by row key
_VERIFY: frozenset = frozenset()  # the row keys compiled even where recorded, and compared (--verify*)
# Bump when a cached row's fields or their reading change (invalidates every cached row).
ROW_FORMAT = 1
RESOURCE_FIELDS = ("regs", "stack", "spill_stores", "spill_loads", "cuobjdump_regs", "cuobjdump_stack",
                   "static_shared", "local", "num_warps", "num_stages", "shared", "ctas_per_sm")


def row_key(src: ASTSource, target: Any, options: Any) -> str:
    """The key of a compiled row: Triton's own cache key of the compile (Triton's source, the
    kernel's source and that of every jit function and constexpr global it uses, signature,
    constexprs, attributes, options, target, the backend's ptxas version, cache-invalidating
    environment variables), plus ``ROW_FORMAT``. A cached row is valid where Triton's cache is."""
    backend, parsed = _backend_options(src, target, options)
    key = get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars())
    return hashlib.sha256(f"kdops-aot-row-{ROW_FORMAT}-{key}".encode()).hexdigest()


def _compile_resources(src: ASTSource, target: Any, options: Any, cc: int) -> dict:
    """Compile ``src`` for ``target``; the resources ptxas, cuobjdump and the metadata report."""
    from triton import knobs

    log = io.StringIO()
    with _setting(knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=target, options=options.__dict__)
    row = parse_ptxas_log(log.getvalue())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    row.update(parse_resource_usage(dump))
    row.update(num_warps=options.num_warps, num_stages=options.num_stages, shared=int(kernel.metadata.shared))
    row["ctas_per_sm"] = ctas_per_sm(cc, row["regs"], options.num_warps, row["shared"] + row["static_shared"])
    return row


def task_key(spec: Spec, cc: int) -> str:
    """:func:`row_key` of ``spec`` compiled for sm_``cc``."""
    target, signature, constexprs, attrs, options = bind(spec.fn, spec.args, spec.kwargs, cc)
    return row_key(ASTSource(spec.fn, signature, constexprs, attrs), target, options)


def _disagreement(row: dict, recorded: dict) -> list[str]:
    """Where a fresh compile's resources differ from the recorded row of the same key."""
    diff = [f"{f} {recorded.get(f)} recorded, {row[f]} compiled" for f in RESOURCE_FIELDS if recorded.get(f) != row[f]]
    return [f"differs from its recorded row ({', '.join(diff)})"] if diff else []


def compile_spec(index: int, cc: int, key: Optional[str] = None) -> dict:
    """Compile ``_SPECS[index]`` for sm_``cc`` and read its resources (in a worker process), or
    take them from the recorded rows (``_RECORDED``) or the row cache, unless the key is in
    ``_VERIFY``: then it is compiled, and fails where it disagrees with its recorded row. The
    checks run on every row, whatever its source."""
    spec = _SPECS[index]
    row = dict(kernel=spec.name, spec=spec.summary, arch=f"sm_{cc}", triton=triton.__version__,
               grid=spec.max_grid, cases=spec.cases)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        target, signature, constexprs, attrs, options = bind(spec.fn, spec.args, spec.kwargs, cc)
        src = ASTSource(spec.fn, signature, constexprs, attrs)
        row["key"] = key = key or row_key(src, target, options)
        cached = _ROW_CACHE / f"{key}.json" if _ROW_CACHE else None
        recorded = _RECORDED.get(key)
        if recorded is not None and key not in _VERIFY:
            row.update(recorded, source="recorded")
        elif cached is not None and cached.exists() and key not in _VERIFY:
            row.update(json.loads(cached.read_text()), source="cached")
        else:
            resources = _compile_resources(src, target, options, cc)
            resources["first_compile_cpu_s"] = round(_cpu_seconds() - cpu_start, 2)
            row.update(resources, source="compiled")
            if cached is not None:  # written whole, then renamed: a reader never sees half a row
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(resources))
                tmp.replace(cached)
        row["errors"] = check(row, cc, spec.max_grid, SPILL_BUDGET)
        if recorded is not None and key in _VERIFY:
            row["errors"] += _disagreement(row, recorded)
            row["verified"] = True
    except Exception as e:  # a compile error is a failure of the check, reported with the rest (never cached)
        row["errors"] = [f"compile error: {type(e).__name__}: {str(e)[-800:]}"]
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["cpu_s"] = round(_cpu_seconds() - cpu_start, 2)
    return row


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas, cuobjdump): a compile's cost
    whatever else loads the machine (its wall time is not)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_all(specs: list[Spec], archs: tuple[int, ...], jobs: int, row_cache: Optional[Path] = None,
                keys: Optional[dict] = None) -> list[dict]:
    """Every spec for every arch, ``jobs`` processes (forked: they inherit the specs), fresh Triton
    cache (so that ptxas runs); rows found in the recorded rows or ``row_cache`` are read, not
    compiled. ``keys``: the row keys of the tasks, where already computed."""
    global _SPECS, _ROW_CACHE
    _SPECS, _ROW_CACHE = specs, row_cache
    if row_cache is not None:
        row_cache.mkdir(parents=True, exist_ok=True)
    tasks = [(i, cc) for cc in archs for i in range(len(specs))]
    with tempfile.TemporaryDirectory(prefix="kdops-aot-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with _fork_pool(jobs) as pool:
            futures = [pool.submit(compile_spec, i, cc, (keys or {}).get((i, cc))) for i, cc in tasks]
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                r = future.result()
                print(f"[aot {done}/{len(tasks)}] triton {r['triton']} {r['arch']} {r['kernel']} regs={r.get('regs')} "
                      f"spill={r.get('spill_stores')}/{r.get('spill_loads')} ({r.get('source', 'failed')}) "
                      f"{'; '.join(r['errors'])[:160]}", file=sys.stderr, flush=True)
            return [f.result() for f in futures]


def load_recorded(path: Path) -> tuple[dict[str, dict], str]:
    """The rows of a committed full run (written by ``--record``), by row key, and why there are
    none where its rows are of another ``ROW_FORMAT`` (then none stands for a compile)."""
    data = json.loads(path.read_text())
    if data.get("row_format") != ROW_FORMAT:
        return {}, f"{path} holds rows of format {data.get('row_format')}, this check reads format {ROW_FORMAT}"
    return {r["key"]: {f: r[f] for f in (*RESOURCE_FIELDS, "first_compile_cpu_s")} for r in data["rows"]}, ""


def write_recorded(path: Path, rows: list[dict], meta: dict) -> None:
    """Every row with resources, one a line: its key, what it is, its resources."""
    keep = ("key", "kernel", "arch", "triton", "spec", *RESOURCE_FIELDS, "first_compile_cpu_s")
    lines = [json.dumps({f: r[f] for f in keep}, separators=(",", ":"))
             for r in sorted(rows, key=lambda r: (r["triton"], r["kernel"], r["arch"], r["spec"])) if "regs" in r]
    head = json.dumps(dict(meta, row_format=ROW_FORMAT, spill_budget_bytes=SPILL_BUDGET), separators=(",", ":"))
    path.write_text(head[:-1] + ',"rows":[\n' + ",\n".join(lines) + "\n]}\n")


# ----------------------------------------------------------------------------- report


def summary_rows(rows: list[dict]) -> list[dict]:
    """One line per (kernel, arch, Triton): count, worst registers / spills / shared, fewest CTAs/SM."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"], r["triton"]), []).append(r)
    out = []
    for (kernel, arch, version), rs in sorted(groups.items()):
        ok = [r for r in rs if "regs" in r]
        out.append(dict(kernel=kernel, arch=arch, triton=version, specs=len(rs),
                        failed=sum(bool(r["errors"]) for r in rs),
                        compiled=sum(r.get("source") == "compiled" for r in rs),
                        max_regs=max((r["regs"] for r in ok), default=None),
                        max_spill=max((max(r["spill_stores"], r["spill_loads"]) for r in ok), default=None),
                        max_shared=max((r["shared"] + r["static_shared"] for r in ok), default=None),
                        min_ctas_per_sm=min((r["ctas_per_sm"] for r in ok), default=None),
                        compile_s=round(sum(r["compile_s"] for r in rs), 1),
                        cpu_s=round(sum(r["cpu_s"] for r in rs), 1)))
    return out


def table(summary: list[dict]) -> str:
    cols = ("kernel", "arch", "triton", "specs", "failed", "compiled", "max_regs", "max_spill", "max_shared",
            "min_ctas_per_sm", "compile_s", "cpu_s")
    cells = [[str(r[c]) for c in cols] for r in summary]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def verify_keys(keys: list[str], quick_keys: list[str], verify_quick: Optional[tuple[int, int]] = None,
                verify_shard: Optional[tuple[int, int]] = None) -> frozenset[str]:
    """The row keys to compile again and compare with their recorded rows: every n-th of the quick
    subset's ``quick_keys`` from the i-th (``verify_quick``), and every n-th of ``keys`` in sorted
    order from the i-th (``verify_shard``; keys are hashes, so a shard is a sample spread over
    every kernel, and the n shards together are every row: ``--verify`` is shard 0/1)."""
    chosen = set()
    if verify_quick is not None:
        chosen |= set(quick_keys[verify_quick[0]::verify_quick[1]]) & set(keys)
    if verify_shard is not None:
        chosen |= set(sorted(set(keys))[verify_shard[0]::verify_shard[1]])
    return frozenset(chosen)


def run_here(m: Matrix, jobs: int, families: tuple[str, ...], shard: tuple[int, int] = (0, 1),
             row_cache: Optional[Path] = None, max_compiles: Optional[int] = None,
             verify_quick: Optional[tuple[int, int]] = None,
             verify_shard: Optional[tuple[int, int]] = None) -> tuple[list[dict], dict]:
    """Capture, dedupe and compile (shard ``i`` of ``n``: every n-th specialisation from the i-th).
    With ``max_compiles``, fail before compiling when more rows than that are neither recorded
    nor cached. The rows of :func:`verify_keys` are compiled even where recorded, and compared."""
    global _SPECS, _VERIFY
    start = time.perf_counter()
    launches = capture(m, families)
    every = specialisations(launches)
    specs = every[shard[0]::shard[1]]
    captured = time.perf_counter() - start
    same = [[f"{s.name} {s.summary}  <- {s.cases[0]}" for s in group] for group in redundant(specs, jobs)]
    digested = time.perf_counter() - start - captured
    _SPECS = specs
    keys = {(i, cc): task_key(spec, cc) for cc in m.archs for i, spec in enumerate(specs)}
    quick = specialisations(capture(quick_matrix(), families)) if verify_quick else []
    _VERIFY = verify_keys(list(keys.values()), [task_key(spec, cc) for cc in m.archs for spec in quick],
                          verify_quick, verify_shard)
    missing = [k for k in keys.values() if k not in _VERIFY and k not in _RECORDED
               and not (row_cache is not None and (row_cache / f"{k}.json").exists())]
    info = dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                launches=len(launches), specialisations=len(every), redundant=same, digest_s=round(digested, 1),
                shard=f"{shard[0]}/{shard[1]}", compiled_specialisations=len(specs), to_compile=len(missing),
                to_verify=len(_VERIFY))
    if max_compiles is not None and len(missing) > max_compiles:
        return [], dict(info, over_max_compiles=max_compiles)
    rows = compile_all(specs, m.archs, jobs, row_cache, keys)
    info.update(compiles=sum(r.get("source") == "compiled" for r in rows),
                cached_rows=sum(r.get("source") == "cached" for r in rows),
                recorded_rows=sum(r.get("source") == "recorded" for r in rows),
                verified_rows=sum(bool(r.get("verified")) for r in rows), capture_s=round(captured, 1),
                compile_wall_s=round(time.perf_counter() - start - captured - digested, 1),
                compile_cpu_s=round(sum(r["cpu_s"] for r in rows), 1))
    return rows, info


def _shard(text: str) -> tuple[int, int]:
    i, n = (int(x) for x in text.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"I/N needs 0 <= I < N; got {text}")
    return i, n


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI subset (see quick_matrix)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                   help="compile processes per Triton (default: the CPU count; the --python runs go alongside)")
    p.add_argument("--python", action="append", default=[], metavar="PY",
                   help="also run the check under interpreter PY (another Triton), in parallel, merged into one report")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES))
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="compile every N-th specialisation from the I-th (split the matrix over machines)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kdops" / "aot-rows",
                   help="compiled rows kept between runs, keyed by Triton's own cache key (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compile everything, read and write no cached row")
    p.add_argument("--json", type=Path, default=None,
                   help="where the rows go (default benchmarks/results/aot[-quick]-<date>.json)")
    p.add_argument("--recorded", type=Path, default=None, metavar="FILE",
                   help="the rows of a committed full run (written by --record): a row of FILE with the same key "
                        "stands for the compile (the checks still run on it)")
    p.add_argument("--verify", action="store_true",
                   help="with --recorded: compile the recorded rows too, and fail where a fresh compile differs")
    p.add_argument("--verify-quick", type=_shard, default=None, metavar="I/N",
                   help="as --verify, for every N-th compile of the quick subset's from the I-th only")
    p.add_argument("--verify-shard", type=_shard, default=None, metavar="I/N",
                   help="as --verify, for every N-th row in key order from the I-th (the N shards are every row)")
    p.add_argument("--max-compiles", type=int, default=None, metavar="N",
                   help="fail, before compiling, when more than N rows per Triton are neither recorded nor cached")
    p.add_argument("--record", type=Path, default=None, metavar="FILE",
                   help="write every row's key and resources to FILE (for --recorded)")
    p.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # a --python child: rows to --json
    args = p.parse_args(argv)
    global _RECORDED
    _RECORDED, stale = load_recorded(args.recorded) if args.recorded else ({}, "")
    m = quick_matrix() if args.quick else Matrix()
    families = tuple(f for f in args.families.split(",") if f)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"--families: unknown {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    row_cache = None if args.no_cache else args.cache
    if args.record and (args.quick or args.shard != (0, 1) or set(families) != set(FAMILIES)):
        p.error("--record takes the full matrix (no --quick, --shard or --families): it replaces the file's rows")

    children = []  # the other Tritons' runs, started first so that they overlap this one
    for py in args.python:
        if os.path.abspath(py) == os.path.abspath(sys.executable):  # (a venv's python links to its base: not resolved)
            continue
        tmp = tempfile.NamedTemporaryFile(suffix=".json")
        cmd = [py, __file__, "--rows-only", "--json", tmp.name, "--jobs", str(args.jobs), "--families",
               ",".join(families), "--shard", f"{args.shard[0]}/{args.shard[1]}",
               *(["--no-cache"] if row_cache is None else ["--cache", str(row_cache)]),
               *(["--quick"] if args.quick else []), *(["--recorded", str(args.recorded)] if args.recorded else []),
               *(["--verify"] if args.verify else []),
               *(["--verify-quick", f"{args.verify_quick[0]}/{args.verify_quick[1]}"] if args.verify_quick else []),
               *(["--verify-shard", f"{args.verify_shard[0]}/{args.verify_shard[1]}"] if args.verify_shard else []),
               *(["--max-compiles", str(args.max_compiles)] if args.max_compiles is not None else [])]
        children.append((tmp, cmd, subprocess.Popen(cmd)))
    start = time.perf_counter()
    rows, info = run_here(m, args.jobs, families, args.shard, row_cache, args.max_compiles, args.verify_quick,
                          (0, 1) if args.verify else args.verify_shard)
    if args.rows_only:
        args.json.write_text(json.dumps(dict(rows=rows, runs=[info])))
        return 0
    runs = [info]
    for tmp, cmd, proc in children:
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        child = json.loads(Path(tmp.name).read_text())
        tmp.close()
        rows += child["rows"]
        runs += child["runs"]
    wall = time.perf_counter() - start
    over = [i for i in runs if "over_max_compiles" in i]
    why = stale or "kernel sources or the toolchain changed since the rows were recorded"
    for i in over:
        print(f"FAIL triton {i['triton']}: {i['to_compile']} rows are neither recorded"
              f"{' in ' + str(args.recorded) if args.recorded else ''} nor cached, more than --max-compiles "
              f"{i['over_max_compiles']} ({why}): "
              "re-record them with `make aot-rows` (the full matrix) and commit the file")
    if over:
        return 1

    summary = summary_rows(rows)
    failures = [r for r in rows if r["errors"]]
    same = [(info["triton"], group) for info in runs for group in info["redundant"]]
    date = datetime.date.today().isoformat()
    scope = ("-quick" if args.quick else "") + (f"-shard{args.shard[0]}of{args.shard[1]}" if args.shard[1] > 1 else "")
    out = args.json or REPO / "benchmarks" / "results" / f"aot{scope}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date,
                  machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, no GPU needed",
                  spill_budget_bytes=SPILL_BUDGET, archs=[f"sm_{a}" for a in m.archs], wall_s=round(wall, 1),
                  runs=runs, summary=summary, failures=len(failures), redundant=len(same), rows=rows)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.record:
        write_recorded(args.record, rows, {k: result[k] for k in ("command", "date", "machine", "archs", "wall_s")}
                       | dict(runs=runs))
    print(table(summary))
    for r in failures:
        print(f"FAIL {r['kernel']} {r['arch']} triton {r['triton']}: {'; '.join(r['errors'])}\n     {r['spec']}\n"
              f"     e.g. {r['cases'][0]}")
    for version, group in same:
        print(f"FAIL triton {version}: {len(group) - 1} specialisations compile to one kernel (one launcher value "
              "passed two ways, or a constexpr the kernel does not read):\n     " + "\n     ".join(group))
    print(f"{sum(i['compiled_specialisations'] for i in runs)} specialisations x {len(m.archs)} archs over "
          f"{', '.join('triton ' + i['triton'] for i in runs)} ({sum(i['compiles'] for i in runs)} compiled, "
          f"{sum(i['cached_rows'] for i in runs)} cached, {sum(i['recorded_rows'] for i in runs)} recorded, "
          f"{sum(i['verified_rows'] for i in runs)} compared with their recorded rows) "
          f"in {wall:.0f} s ({sum(i['compile_cpu_s'] for i in runs):.0f} "
          f"CPU s of compiles): {len(failures)} failing, {len(same)} redundant; rows in {out}")
    return 1 if failures or same else 0


if __name__ == "__main__":
    sys.exit(main())
