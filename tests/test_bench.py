"""kdops.bench: the command line run in-process on tiny shapes (JSON, Markdown, plot), shape
selection, skipped baselines, failing methods, ratios, and the results page."""
import ctypes
import json
import sys
from pathlib import Path

import pytest
import torch

import kdops
from kdops.bench import cli, measure, report, workloads

TINY = ["--repeats", "1", "--warmup", "0", "--compile-backend", "eager", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One in-process run of four ops on odd tiny shapes; returns (json path, result)."""
    out_dir = tmp_path_factory.mktemp("results")
    argv = ["--ops", "kd", "fused_linear", "sparse_kd", "sp", "--shapes", "6x50", "fused_linear:5x7x33",
            "sparse_kd:6x50x7", *TINY,
            "--out-dir", str(out_dir), "--name", "tiny"]
    assert cli.main(argv) == 0
    path = out_dir / "tiny-cpu-{}.json".format(measure.machine_info(torch.device("cpu"))["date"])
    return path, json.loads(path.read_text())


def test_json_structure(tiny_run):
    path, result = tiny_run
    assert result["suite"] == report.SUITE and result["benchmark"] == "tiny"
    assert result["command"].startswith("python -m kdops.bench --ops kd fused_linear sparse_kd sp --shapes 6x50")
    assert result["device_name"] == result["machine"]["cpu"]
    for key in ("date", "torch", "kdops", "python", "cpu_count", "backends"):
        assert key in result["machine"]
    assert result["settings"]["repeats"] == 1 and "VmHWM" in result["settings"]["memory"]
    assert result["ops"] == ["kd", "fused_linear", "sparse_kd", "sp"]
    by_op = {op: [r for r in result["rows"] if r["op"] == op] for op in result["ops"]}
    assert {r["shape"] for r in by_op["kd"]} == {"6x50"} and {r["shape"] for r in by_op["sp"]} == {"6x50"}
    assert {(r["N"], r["H"], r["V"]) for r in by_op["fused_linear"]} == {(5, 7, 33)}
    assert {(r["N"], r["V"], r["K"]) for r in by_op["sparse_kd"]} == {(6, 50, 7)}
    native = {"kdops-cpu"} if kdops.available_backends()["cpu"].available else set()
    expected = {"torch-eager", "torch-compile"} | native
    assert expected <= {r["method"] for r in by_op["kd"]}
    assert "kdops-unfused" in {r["method"] for r in by_op["fused_linear"]}
    for rows in by_op.values():
        eager = next(r for r in rows if r["method"] == "torch-eager")
        for r in rows:
            assert "error" not in r, r
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_extra_mib"] >= 0 and r["torch_peak_mib"] >= 0
            assert r["speedup_fwd_bwd"] == pytest.approx(eager["fwd_bwd_ms"] / r["fwd_bwd_ms"])
            assert r["memory_ratio"] is None  # the eager peak is below 1 MiB: noise, no ratio
    assert any(n.startswith("liger-kldiv: skipped (GPU only)") for n in result["notes"])
    assert any(n.startswith("kdops-triton: skipped") for n in result["notes"])


def test_markdown_and_plot(tiny_run):
    path, result = tiny_run
    text = path.with_suffix(".md").read_text()
    assert f"`{result['command']}`" in text and f"({result['machine']['cpu_count']} cores)" in text
    for op in result["ops"]:
        assert f"## {op}: " in text
    header = "| dtype | shape | method | fwd ms | fwd+bwd ms |"
    assert text.count(header) == 4
    table_rows = [line for line in text.splitlines() if line.startswith("| float32 |")]
    assert len(table_rows) == len(result["rows"])
    if any(n.startswith("plots skipped") for n in result["notes"]):
        assert not path.with_suffix(".png").exists()
    else:
        assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_plot_skipped_without_matplotlib(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why_not = report.plot(tiny_run[1], tmp_path / "x.png")
    assert why_not.startswith("plots skipped: matplotlib is not installed")
    assert not (tmp_path / "x.png").exists()


def test_results_page(tiny_run, tmp_path):
    path, result = tiny_run
    (tmp_path / path.name).write_text(path.read_text())
    legacy = {"benchmark": "affinity", "machine": result["machine"],
              "rows": [{"loss": "sp", "method": "reference", "batch": 8, "fwd_bwd_ms": 1.25}],
              "tables": {"students": [{"student": "top-8 cache", "perplexity": 80.5}], "empty": []}}
    (tmp_path / "affinity-cpu-2026-01-01.json").write_text(json.dumps(legacy))
    (tmp_path / "unrelated.json").write_text("[1, 2]")
    assert cli.main(["report", "--results-dir", str(tmp_path)]) == 0
    page = (tmp_path / "README.md").read_text()
    assert page.startswith("# kdops performance")
    assert page.index("## affinity: `affinity-cpu-2026-01-01.json`") < page.index(f"## tiny: `{path.name}`")
    assert "command: not recorded (written by `benchmarks/bench_affinity.py`)" in page
    assert f"`{result['command']}`" in page and page.count("- machine: ") == 2
    assert "| loss | method | batch | fwd_bwd_ms |" in page and "| sp | reference | 8 | 1.25 |" in page
    assert "students:\n\n| student | perplexity |\n|---|---|\n| top-8 cache | 80.5 |" in page
    assert "empty:" not in page
    assert "unrelated" not in page


def test_shapes_per_op():
    cpu = torch.device("cpu")
    ops = cli.selected_ops(["kd", "affinity", "kd"])
    assert ops == ["kd", "sp", "rkd_distance", "rkd_angle"]
    shapes = cli.shapes_per_op(ops, ["64x100", "rkd_angle:9x4"], cpu)
    assert shapes == {"kd": ["64x100"], "sp": ["64x100"], "rkd_distance": ["64x100"], "rkd_angle": ["64x100", "9x4"]}
    assert cli.shapes_per_op(["kd", "fused_linear"], ["kd:8x9"], cpu)["fused_linear"] == ["4096x1024x32000"]
    for bad, match in (["3x4x5x6"], "no selected op takes 4 sizes"), (["nope:3x4"], "not an op or preset"), \
                      (["3xa"], "sizes joined by x"), (["0x4"], "positive"):
        with pytest.raises(ValueError, match=match):
            cli.shapes_per_op(["kd"], bad, cpu)
    with pytest.raises(SystemExit):
        cli.main(["--ops", "kd", "--shapes", "3x4x5"])


def test_external_baselines_skip_cleanly():
    options = workloads.Options(2.0, None, workloads.BASELINES, "eager")
    found, notes = {}, []
    build = lambda: pytest.fail("must not be built")
    workloads._add_external(found, notes, torch.device("cuda"), options, "liger", "no_such_module_kdops", "x", build)
    workloads._add_external(found, notes, torch.device("cpu"), options, "liger", "torch", "y", build)
    workloads._add_external(found, notes, torch.device("cuda"), options._replace(baselines=("eager",)), "liger",
                            "torch", "z", build)
    assert found == {} and notes == ["x: skipped (no_such_module_kdops is not installed)", "y: skipped (GPU only)"]

    def old_api():
        raise ImportError("cannot import name 'LigerKLDIVLoss'")

    workloads._add_external(found, notes, torch.device("cuda"), options, "liger", "torch", "w", old_api)
    assert found == {} and notes[-1] == "w: skipped (ImportError: cannot import name 'LigerKLDIVLoss')"


def test_failing_method_is_a_row(monkeypatch):
    args = cli._parser().parse_args(TINY)
    workload = workloads.OPS["kd"].make({"N": 3, "V": 5}, torch.float32, torch.device("cpu"))

    def broken(s, t):
        raise RuntimeError("kernel exploded\nsecond line")

    assert cli.measure_method(broken, workload, torch.device("cpu"), args) == {"error": "RuntimeError: kernel exploded"}
    rows = [dict(op="kd", dtype="float32", shape="3x5", method="torch-eager", fwd_ms=2.0, fwd_bwd_ms=4.0,
                 peak_extra_mib=10.0),
            dict(op="kd", dtype="float32", shape="3x5", method="kdops-cpu", fwd_ms=1.0, fwd_bwd_ms=1.0,
                 peak_extra_mib=2.5),
            dict(op="kd", dtype="float32", shape="3x5", method="x", error="out of memory")]
    cli.add_ratios(rows)
    assert (rows[1]["speedup_fwd"], rows[1]["speedup_fwd_bwd"], rows[1]["memory_ratio"]) == (2.0, 4.0, 0.25)
    assert rows[0]["memory_ratio"] == 1.0 and "speedup_fwd" not in rows[2]


def test_cpu_peak_memory_sees_torch_allocations():
    cpu, mib = torch.device("cpu"), measure.MiB
    # the state a long test process reaches (the CI failure: the resident-set peak read 0): a
    # freed 20 MiB heap chunk whose pages stay resident, from which the 16 MiB below is served
    libc, trim_threshold, mmap_threshold = ctypes.CDLL("libc.so.6"), -1, -3
    try:
        libc.mallopt(trim_threshold, 2**30)
        libc.mallopt(mmap_threshold, 2**25)
        torch.ones(5 * 2**20)  # freed at once, kept resident
        measure.return_freed_memory()
        sixteen_mib = lambda: torch.ones(2**22).add_(1)
        assert 15 * mib <= measure.peak_extra_bytes(sixteen_mib, cpu) <= 48 * mib
        assert 16 * mib <= measure.torch_cpu_peak_bytes(sixteen_mib) <= 16 * mib + 2**16  # + small scalars
    finally:
        libc.mallopt(trim_threshold, 128 * 1024)  # glibc's default


def test_script_wrappers_keep_their_helpers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_kd
    finally:
        sys.path.pop(0)
    for name in ("DTYPES", "MiB", "machine_info", "median_seconds", "peak_extra_bytes", "torch_eager"):
        assert hasattr(bench_kd, name)
    cpu = torch.device("cpu")
    assert bench_kd.median_seconds(lambda: None, cpu, repeats=3, warmup=1) >= 0
