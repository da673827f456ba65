"""The plumbing of tools/aot_check.py (capture, binding, dedupe, ptxas / cuobjdump parsing, the
checks) on a tiny case, and the CPU dry run of benchmarks/gpu_check.py. The check compiles for
GPUs, so it runs in a subprocess without TRITON_INTERPRET (this process interprets)."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(code: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_capture_bind_dedupe_and_compile_one():
    """kd launches at K = 1 and K = 3 (two vocabularies: one specialisation each, also where the
    teacher stride N * V passes 2^31: it is annotated int64, or Triton would bind it as i32 at
    V = 32000 and i64 at V = 262144, two JIT compiles of one kernel), the specialisations
    Triton's binder gives them, and one real compile for sm_90 read back."""
    out = _run("""
        import json, sys, torch
        sys.path.insert(0, "tools")
        import aot_check as a
        m = a.Matrix(dtypes=(torch.bfloat16,), vocabs=(32000, 262144), divergences=(2,), kd_divergences=(),
                     teachers=(1, 3), label_modes=("hard",), grads=(True,))
        launches = a.capture(m, ("kd",))
        specs = a.specialisations(launches)
        _, signature, constexprs, attrs, options = a.bind(specs[0].fn, specs[0].args, specs[0].kwargs, 90)
        affinity = a.specialisations(a.capture(a.Matrix(dtypes=(torch.float32,), batches=(100,), features=(8,)),
                                               ("affinity",)))
        a._SPECS = [s for s in affinity if s.name == "_sq_norms_kernel"]
        import os, tempfile
        from pathlib import Path
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # a cached kernel runs no ptxas (as compile_all)
        a._ROW_CACHE = Path(tempfile.mkdtemp())
        row = a.compile_spec(0, 90)
        again = a.compile_spec(0, 90)  # read from the row cache, checked again
        a.SPILL_BUDGET = -1  # every row now over budget: the check runs on the cached row too
        over = a.compile_spec(0, 90)
        other_arch = a.compile_spec(0, 100)  # another key: compiled
        cached_files = len(list(a._ROW_CACHE.iterdir()))
        a.SPILL_BUDGET, a._ROW_CACHE = 32, None
        record = Path(tempfile.mkdtemp()) / "rows.json"  # a committed full run's rows (--record)
        a.write_recorded(record, [row, other_arch], dict(date="today"))
        a._RECORDED, _ = a.load_recorded(record)
        recorded = a.compile_spec(0, 90)  # the recorded row stands for the compile
        a._VERIFY = frozenset([row["key"]])  # --verify: compiled again, compared with the recorded row
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
        verified = a.compile_spec(0, 90)
        a._RECORDED[row["key"]] = dict(a._RECORDED[row["key"]], regs=row["regs"] + 1)  # a row that lies
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
        disagrees = a.compile_spec(0, 90)
        print(json.dumps(dict(launches=len(launches), specs=[s.summary for s in specs], cases=specs[0].cases,
                              grid=specs[0].max_grid, signature={k: str(v) for k, v in signature.items()},
                              num_warps=options.num_warps, row=row, again=again, over=over,
                              other_arch=other_arch, cached_files=cached_files, recorded=recorded,
                              verified=verified, disagrees=disagrees, record_rows=len(a._RECORDED))))
    """)
    assert out["launches"] == 4  # 2 vocabularies x 2 teacher counts
    assert len(out["specs"]) == 2  # the vocabulary changes no specialisation here
    single, multi = sorted(out["specs"], key=lambda s: "MULTI=True" in s)
    assert "MULTI=False" in single and "BLOCK_V=4096" in single and "DIV=2" in single
    assert "MULTI=True" in multi and "BLOCK_K=4" in multi and "BLOCK_V=1024" in multi
    assert out["grid"] == [8192, 1, 1] and len(out["cases"]) == 2
    assert out["signature"]["student_ptr"] == "*bf16" and out["signature"]["labels_ptr"] == "*i64"
    assert out["signature"]["teacher_k_stride"] == "i64"
    # the flags are runtime bools: not constexprs, not value-specialised
    assert out["signature"]["has_hard"] in ("i1", "u1") and out["signature"]["compute_grad"] in ("i1", "u1")
    row = out["row"]
    assert row["errors"] == [] and row["arch"] == "sm_90" and row["kernel"] == "_sq_norms_kernel"
    assert 0 < row["regs"] <= 255 and row["spill_stores"] == 0 and row["ctas_per_sm"] >= 1
    assert row["cuobjdump_regs"] == row["regs"]
    assert row["source"] == "compiled" and out["again"]["source"] == "cached"
    assert out["other_arch"]["source"] == "compiled" and out["other_arch"]["key"] != row["key"]
    for name in ("regs", "spill_stores", "shared", "ctas_per_sm"):
        assert out["again"][name] == row[name]
    assert out["again"]["errors"] == [] and "budget -1 B" in " ".join(out["over"]["errors"])
    assert out["other_arch"]["arch"] == "sm_100" and out["cached_files"] == 2
    # recorded rows: taken by key (and checked); with --verify compiled again and compared
    assert out["record_rows"] == 2
    assert out["recorded"]["source"] == "recorded" and out["recorded"]["errors"] == []
    assert out["verified"]["source"] == "compiled" and out["verified"]["errors"] == []
    for name in ("regs", "spill_stores", "shared", "ctas_per_sm"):
        assert out["recorded"][name] == out["verified"][name] == row[name]
    assert out["disagrees"]["errors"] == [f"differs from its recorded row (regs {row['regs'] + 1} recorded, "
                                          f"{row['regs']} compiled)"]


def test_attention_relation_capture_and_shards():
    """The attention relation's launches: forward, query-block and key-block gradient kernels per
    case, 8 warps from 256 words a tile row (student head size 128 here), 4 below; tiles of 32
    rows for bf16 and 16 for float32; neither the sequence length, the head count nor the mask
    changes a specialisation; shards partition the specialisations."""
    out = _run("""
        import json, sys, torch
        sys.path.insert(0, "tools")
        import aot_check as a
        m = a.Matrix(dtypes=(torch.bfloat16, torch.float32), divergences=(2,), attention_heads=((1, 12), (2048, 32)),
                     attention_lengths=(512, 8192), attention_head_sizes=(32, 128), attention_teacher_sizes=(128,),
                     attention_causal=(True,), attention_masked=(False, True))
        launches = a.capture(m, ("attention_relation",))
        specs = a.specialisations(launches)
        shards = [a.specialisations(launches)[i::3] for i in range(3)]
        print(json.dumps(dict(launches=len(launches), specs=[[s.name, s.summary, s.max_grid] for s in specs],
                              shards=sorted(s.summary for shard in shards for s in shard), limits=a.GRID_LIMITS)))
    """)
    assert out["launches"] == 2 * 2 * 2 * 2 * 2 * 3  # dtypes x (B, H) x L x head sizes x masks x 3 kernels
    specs = out["specs"]
    # the sequence lengths fold (runtime ints, all multiples of 16), so do the masks (a runtime flag,
    # the absent mask an empty uint8 tensor) and H = 12 and 32 (not specialised on divisibility by
    # 16): kernels x (bf16: 2 head sizes; float32: 1, its head tiles padded to the teacher's 128)
    assert len(specs) == 3 * (2 + 1)
    assert sorted(s[1] for s in specs) == out["shards"]
    names = [s[0] for s in specs]
    assert names.count("_forward_kernel") == 3 and names.count("_backward_kernel") == 6
    for name, summary, grid in specs:
        wide = "BLOCK_DS=128" in summary  # 256 words a tile row from bf16 at 128 / 128
        assert "BLOCK_DS=128" in summary or "ptrs=*bf16" in summary
        assert ("warps=8" if wide else "warps=4") in summary, summary
        rows = 32 if "ptrs=*bf16" in summary else 16  # tile rows: 32 for 16-bit inputs, 16 for float32
        assert f"BLOCK_M={rows} BLOCK_N={rows}" in summary, summary
        # one axis: B * H x blocks of the longest sequence (B * H = 65536 passes CUDA's 65535 for axis y)
        assert grid[0] in (12 * 8192 // rows, 65536 * 8192 // rows) and grid[1:] == [1, 1], grid
        assert all(n <= top for n, top in zip(grid, out["limits"]))


def test_redundant_specialisations():
    """Two spellings of one constexpr (``True`` and ``tl.constexpr(True)``) are two Triton
    specialisations of one kernel: the check groups them. The affinity and relation launchers
    pass one spelling (the relation backward passed the dX kernel's DIST as a tl.constexpr, the
    affinity backward as a bool: two JIT compiles of each variant on a GPU)."""
    out = _run("""
        import dataclasses, json, sys, torch
        import triton.language as tl
        sys.path.insert(0, "tools")
        import aot_check as a
        specs = a.specialisations(a.capture(a.Matrix(dtypes=(torch.float32,), batches=(100,), features=(8,)),
                                            ("affinity",)))
        apply = [s for s in specs if s.name == "_apply_weights_kernel"]
        first = apply[0]
        spelled = dataclasses.replace(first, kwargs=dict(first.kwargs, DIST=tl.constexpr(first.kwargs["DIST"])))
        groups = [[repr(s.kwargs["DIST"]) for s in g] for g in a.redundant(specs + [spelled], jobs=2)]
        print(json.dumps(dict(specs=len(specs), apply=len(apply), groups=groups)))
    """)
    assert out["specs"] > out["apply"] == 4  # GRAM / DIST x with / without the close-pair tiles
    [group] = out["groups"]  # the added spelling, only
    assert group == ["False", "constexpr[False]"]


def test_parsers_and_checks():
    out = _run("""
        import json, sys
        sys.path.insert(0, "tools")
        import aot_check as a
        log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\\n"
               "ptxas info    : Function properties for k\\n"
               "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\\n"
               "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size\\n")
        dump = "Function k:\\n REG:255 STACK:48 SHARED:0 LOCAL:0 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0\\n"
        parsed = {**a.parse_ptxas_log(log), **a.parse_resource_usage(dump)}
        row = dict(parsed, shared=240000, num_warps=8, ctas_per_sm=a.ctas_per_sm(90, 255, 8, 240000))
        errors = a.check(row, 90, [70000, 70000, 1], budget=32)
        keys = [f"{i:02x}" * 32 for i in range(40, 0, -1)]  # row keys (hex digests), unsorted
        shards = [sorted(a.verify_keys(keys, [], verify_shard=(i, 7))) for i in range(7)]
        quick = sorted(a.verify_keys(keys, keys[:5] + ["ff" * 32], verify_quick=(1, 2)))
        both = a.verify_keys(keys, keys[:6], verify_quick=(0, 3), verify_shard=(0, 20))
        import tempfile
        from pathlib import Path
        old = Path(tempfile.mkdtemp()) / "rows.json"
        old.write_text(json.dumps(dict(row_format=a.ROW_FORMAT - 1, rows=[dict(key="k")])))
        print(json.dumps(dict(parsed=parsed, errors=errors, ctas=[a.ctas_per_sm(90, 64, 4, 0),
                                                                  a.ctas_per_sm(80, 128, 8, 100000)],
                              keys=keys, shards=shards, quick=quick, both=sorted(both),
                              none=sorted(a.verify_keys(keys, keys)),
                              everything=sorted(a.verify_keys(keys, [], None, (0, 1))),
                              stale=a.load_recorded(old), fmt=a.ROW_FORMAT)))
    """)
    assert out["parsed"] == dict(regs=255, stack=48, spill_stores=40, spill_loads=36, cuobjdump_regs=255,
                                 cuobjdump_stack=48, static_shared=0, local=0)
    text = " | ".join(out["errors"])
    for expected in ("shared memory 240000 B > 232448", "grid[1] = 70000 > CUDA's 65535",
                     "no CTA fits an SM", "spills 40 B stores / 36 B loads > budget 32 B"):
        assert expected in text, text
    assert "grid[0]" not in text  # 2^31 - 1 blocks allowed along x
    assert out["ctas"] == [8, 1]  # 64 regs x 128 threads: the register file holds 8 CTAs; 100 KB smem: 1
    # --verify-shard I/N: the N shards are disjoint, each a spread of the sorted keys, together every key
    keys, shards = out["keys"], out["shards"]
    assert sorted(k for shard in shards for k in shard) == sorted(keys) == out["everything"]
    assert [len(x) for x in shards] == [6, 6, 6, 6, 6, 5, 5] and shards[0][:2] == [sorted(keys)[0], sorted(keys)[7]]
    assert out["quick"] == sorted([keys[1], keys[3]])  # every 2nd quick key from the 1st, of the matrix only
    assert out["both"] == sorted({keys[0], keys[3], sorted(keys)[0], sorted(keys)[20]}) and out["none"] == []
    rows, why = out["stale"]  # a record of another row format: no row stands for a compile, and it says why
    assert rows == {} and why.endswith(f"holds rows of format {out['fmt'] - 1}, this check reads format {out['fmt']}")


def test_gpu_check_dry_run(tmp_path):
    """Every step of make gpu-check on CPU with tiny shapes; the JSON names each step and its status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    # the plumbing, not the GPU's timing: a budget a loaded 2-core machine keeps (460 s is the GPU run's)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out-dir", str(tmp_path),
                           "--budget", "2400"], cwd=REPO, env=env, capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (result_file,) = tmp_path.glob("gpu-check-dry-run-*.json")
    result = json.loads(result_file.read_text())
    steps = [s["step"] for s in result["steps"]]
    assert steps[:3] == ["build (import check)", "cuda tests", "sanitizer payload"]
    assert {"bench kd", "bench fused-linear", "bench sparse-kd", "bench relation",
            "bench attention-relation"} <= set(steps)
    assert all(s["status"] == "ok" for s in result["steps"])
    assert all(s["bench"]["rows"] for s in result["steps"] if s["step"].startswith("bench"))
    assert not list(tmp_path.glob("*.partial.json"))  # a finished benchmark drops its rows-so-far file
    assert result["versions"]["torch"] and proc.stdout.strip().splitlines()[-1].startswith("total")


def test_gpu_check_steps(tmp_path):
    """--steps runs only the steps whose names start so (the CPU dry run's import check here); a
    prefix that names none is a usage error that says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out-dir", str(tmp_path)]
    proc = subprocess.run([*cmd, "--steps", "build"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (result_file,) = tmp_path.glob("gpu-check-dry-run-*.json")
    assert [s["step"] for s in json.loads(result_file.read_text())["steps"]] == ["build (import check)"]
    bad = subprocess.run([*cmd, "--steps", "nope"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--steps nope: no step's name starts so" in bad.stderr
