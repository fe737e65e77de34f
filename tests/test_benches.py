"""The GPU benches also run at tiny size on a CPU, and their quality guard holds there."""
from __future__ import annotations

import pytest

import subprocess
import sys
from pathlib import Path

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]  # each runs a bench end to end in other processes

REPO = Path(__file__).resolve().parents[1]


def test_dit_bench_runs_at_tiny_size_and_lossless_levers_match():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dit_gpu.py"), "--model", "tiny", "--size", "128", "--frames", "9",
         "--steps", "2", "--levers", "batched,sdpa_math,batched+compile", "--device", "cpu"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    names = {"plain", "batched", "sdpa_math", "batched+compile"}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in names}
    assert set(rows) == names
    assert float(rows["batched"][-1]) < 1e-5  # batching the guidance passes is lossless
    assert float(rows["sdpa_math"][-1]) < 1e-4  # another attention kernel, same math
    assert float(rows["batched+compile"][-1]) < 1e-4  # inductor's kernels, same math (nan if it failed)


def test_pipeline_bench_real_size_path_runs_at_mini_widths():
    """``--scale real`` builds every model on meta and fills it on the device; ``mini`` runs
    that same path at the tiny widths, so the GPU bench's own code is exercised here."""
    import json

    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline_gpu.py"), "--scale", "mini", "--size", "multitalk-128",
         "--frames", "9", "--steps", "1", "--device", "cpu", "--dtype", "bfloat16"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    report = json.loads(out[out.index("{"):])
    assert report["video"] == "176x96x9" and report["dtype"] == "torch.bfloat16"


def test_pipeline_bench_runs_end_to_end_at_tiny_size():
    import json

    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline_gpu.py"), "--scale", "tiny", "--size", "multitalk-128",
         "--frames", "9", "--steps", "1", "--device", "cpu", "--batch-guidance"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    report = json.loads(out[out.index("{"):])
    assert report["video"] == "176x96x9"
    assert set(report["timings_s"]) >= {"prepare", "encode", "diffusion", "decode", "mux", "total"}


def test_load_memory_bench_runs_and_reports_both_loaders():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load_memory.py"), "--dim", "256", "--layers", "2",
         "--dtype", "bfloat16"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()
            if line.split()[:1] in (["ours"], ["naive"])}
    assert set(rows) == {"ours", "naive"}
    assert all(len(r) == 4 for r in rows.values())


def test_lora_switch_bench_runs_small_and_both_mechanisms_agree():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lora_switch.py"), "--dim", "256", "--layers", "1", "--rank", "16",
         "--grid", "2", "8", "16", "--repeats", "1"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    assert "bit for bit: unmerged True, merge on switch True" in out
    agree = float(out.split("max rel diff ")[1].split()[0])
    assert agree < 1e-5
    assert "EXTRAPOLATION" in out and out.count("none→A") == 1
