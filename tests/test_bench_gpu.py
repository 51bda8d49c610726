"""bench/gpu.py on CPU (--tiny): every configuration is measured in one real run, and the ratios
are against the open_clip baseline of that same run."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CPU run of every configuration (compile through aot_eager: inductor's C++ build takes ~30 s
    per compiled row on 2 cores); its stdout and JSON."""
    out = tmp_path_factory.mktemp("bench-gpu")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--compile-backend", "aot_eager",
         "--workers", "1", "--threads", "1", "--json", str(out / "result.json"), "--work", str(out / "work")],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((out / "result.json").read_text())


def table_rows(stdout: str, labels: list[str]) -> dict[str, list[float]]:
    """The printed table: label → [samples/s, median, ms/step, x o_c, x o_c same compile, memory MiB, warm-up s]."""
    rows = {}
    for line in stdout.splitlines():
        for name in labels:
            rest = line[len(name):] if line.startswith(name + " ") else None
            if rest is not None and re.fullmatch(r"(\s+[-\d.x]+){7}", rest):
                rows[name] = [float(v.rstrip("x")) if v != "-" else math.nan for v in rest.split()]
    return rows


@pytest.mark.slow
def test_every_configuration_is_measured_against_this_runs_baseline(tiny_run):
    stdout, result = tiny_run
    bench = load_bench()
    assert "device: cpu" in stdout
    assert result["device"] == "cpu" and result["model"] == "sa-tiny" and result["memory"] == "peak_rss_sampled"
    names = [r["name"] for r in result["rows"]]
    assert names == list(bench.CONFIGS)
    labels = [bench.label(n) for n in names]
    assert len(set(labels)) == len(labels)

    printed = table_rows(stdout, labels)
    assert set(printed) == set(labels), stdout
    base = result["rows"][0]
    assert base["name"] == bench.BASELINE
    for row in result["rows"]:
        steps = row["step_s"]
        assert len(steps) == result["warmup"] + result["steps"] and all(t > 0 for t in steps)
        rate = 2 * result["pairs"] * result["steps"] / sum(steps[result["warmup"]:])
        assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(rate)
        assert row["ratio_vs_baseline"] == pytest.approx(row["samples_per_s"] / base["samples_per_s"])
        same = result["rows"][names.index(bench.BASELINE + ("+compile" if row["compile"] else ""))]
        assert row["ratio_vs_same_compile"] == pytest.approx(row["samples_per_s"] / same["samples_per_s"])
        assert row["peak_memory_bytes"] > 50 * 2**20  # a Python process with torch imported

        # The printed row is the JSON row, and its ratio is computed from the printed baseline.
        samples_s, _, ms, ratio, ratio_same, mib, _ = printed[row["label"]]
        assert samples_s == pytest.approx(row["samples_per_s"], abs=0.05)
        assert ms == pytest.approx(1000 * 2 * result["pairs"] / row["samples_per_s"], rel=1e-3, abs=0.05)
        assert ratio == pytest.approx(samples_s / printed[bench.label(bench.BASELINE)][0], abs=0.011)
        assert ratio_same == pytest.approx(row["ratio_vs_same_compile"], abs=0.006)
        assert mib == pytest.approx(row["peak_memory_bytes"] / 2**20, abs=0.5)
    # The baseline row is its own reference.
    assert printed[bench.label(bench.BASELINE)][3] == 1.0


def test_add_ratios_uses_the_rows_given():
    bench = load_bench()
    rows = [{"name": "open_clip", "compile": False, "samples_per_s": 200.0},
            {"name": "open_clip+compile", "compile": True, "samples_per_s": 250.0},
            {"name": "cached", "compile": False, "samples_per_s": 600.0},
            {"name": "cached+compile", "compile": True, "samples_per_s": 1000.0}]
    bench.add_ratios(rows)
    assert [r["ratio_vs_baseline"] for r in rows] == [1.0, 1.25, 3.0, 5.0]
    assert [r["ratio_vs_same_compile"] for r in rows] == [1.0, 1.0, 3.0, 4.0]
    rows = [{"name": "open_clip", "compile": False, "samples_per_s": 100.0},
            {"name": "live+compile", "compile": True, "samples_per_s": 150.0}]
    bench.add_ratios(rows)  # no compiled baseline in this run: no same-compile ratio
    assert rows[1]["ratio_vs_baseline"] == 1.5 and rows[1]["ratio_vs_same_compile"] is None
    rows = [{"name": "open_clip", "compile": False, "error": "OutOfMemoryError"},
            {"name": "cached", "compile": False, "samples_per_s": 150.0}]
    bench.add_ratios(rows)  # a failed baseline: no ratio at all, rather than one against another row
    assert "ratio_vs_baseline" not in rows[0] and rows[1]["ratio_vs_baseline"] is None


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--configs", "open_clip,cached+compile,cached",
         "--compile-backend", "no_such_backend", "--warmup", "1", "--steps", "1", "--workers", "0", "--threads", "1",
         "--json", str(tmp_path / "result.json")],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and "failed: cached+compile" in done.stderr, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["open_clip", "cached", "cached+compile"] and result["complete"]  # CONFIGS order
    assert "no_such_backend" in rows["cached+compile"]["error"]
    assert rows["cached"]["samples_per_s"] > 0
    assert rows["cached"]["ratio_vs_baseline"] == pytest.approx(rows["cached"]["samples_per_s"] / rows["open_clip"]["samples_per_s"])
    assert re.search(r"^ours, feature cache, compiled +FAILED: .*no_such_backend", done.stdout, re.M)


def test_arguments():
    bench = load_bench()
    gpu = bench.parse([])
    assert (gpu.model, gpu.pairs, gpu.warmup) == ("ViT-B-32", 512, 5) and gpu.configs == list(bench.CONFIGS)
    tiny = bench.parse(["--tiny", "--configs", "cached, open_clip", "--pairs", "2"])
    assert (tiny.model, tiny.pairs) == ("sa-tiny", 2) and tiny.configs == ["open_clip", "cached"]
    for bad in (["--configs", "live,cached"], ["--configs", "open_clip,fast"], ["--tiny", "--warmup", "0"],
                ["--tiny", "--records", "2", "--pairs", "4"]):
        with pytest.raises(SystemExit):
            bench.parse(bad)
