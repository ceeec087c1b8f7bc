"""The GPU benchmark's CPU smoke mode runs every code path it times on the GPU (no
timing is asserted: speed lives in benchmarks/, this only keeps the script working)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_cpu_smoke_run_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--cpu", "--tiny",
         "--repeats", "1", "--steps", "2", "--authors-n", "2", "--profile",
         "--channels-last", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = set(result["cases"])
    for n in (1, 2, 3):
        for kind in ("uncached", "cached"):
            assert f"magicface N={n} {kind} (eager)" in names
            # The eager loop times the first bias form only ("dense" by default).
            assert f"magicface N={n} {kind} (eager) [folded]" not in names
    assert {"ours vanilla (eager)", "authors' pattern N=2 (fp32, explicit)",
            "diffusers SD1.5 (eager)"} <= names
    assert all(c["median_s"] > 0 for c in result["cases"].values())
    assert "eager" in set(result["summary"])
    assert "speedup_vs_authors_pattern_n2" in result["summary"]["eager"]
    assert result["channels_last"] is True
    profiles = result["profiles"]
    assert set(profiles) == {f"N=2 {c} (eager) [{b}]" for c in ("uncached", "cached")
                             for b in ("dense", "folded")}
    for p in profiles.values():
        assert p["total_us"] > 0 and p["top"] and all(r["count"] >= 1 for r in p["top"])


def test_gpu_bench_folded_form_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--cpu", "--tiny",
         "--repeats", "1", "--steps", "2", "--authors-n", "", "--no-diffusers",
         "--bias", "folded", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "magicface N=2 cached (eager) [folded]" in result["cases"]
    assert "magicface N=2 cached (eager)" not in result["cases"]
    assert "eager [folded]" in result["summary"]


def test_gpu_bench_folds_only_the_levels_asked_for(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--cpu", "--tiny",
         "--repeats", "1", "--steps", "2", "--authors-n", "", "--no-diffusers", "--n", "2",
         "--bias", "folded:256", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["cases"]) == {"ours vanilla (eager)",
                                    "magicface N=2 uncached (eager) [folded:256]",
                                    "magicface N=2 cached (eager) [folded:256]"}
    assert "eager [folded:256]" in result["summary"]


def test_gpu_bench_rejects_an_unknown_bias_form():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--cpu", "--tiny",
         "--bias", "sparse"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "unknown form" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--cpu", "--tiny",
         "--bias", "folded:many"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "folded:many" in proc.stderr


def test_attention_bench_cpu_smoke_run(tmp_path):
    out = tmp_path / "attn.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention_bench.py"), "--cpu",
         "--repeats", "1", "--inner", "1", "--concepts", "1", "--fold-multiples", "8,32",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    for level in ("64x64", "32x32"):
        assert cases[f"{level} N=1 dense"] > 0 and cases[f"{level} N=1 folded"] > 0
        # The two bias forms compute the same attention (fp32 on the CPU).
        assert cases[f"{level} N=1 folded_vs_dense_rel_err"] < 1e-5
        assert cases[f"{level} N=1 folded/m32"] > 0


@pytest.mark.slow  # about a minute: two fresh processes load and warm the model
def test_batch_bench_cpu_smoke_run_covers_batching_and_cold_start(tmp_path):
    out = tmp_path / "batch.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "batch_bench.py"), "--cpu", "--tiny",
         "--repeats", "1", "--steps", "2", "--cold-start", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert cases["cached_n1"]["jobs"] == 8 and cases["uncached_n2"]["jobs"] == 4
    for name in ("cached_n1", "uncached_n2"):
        # The batched path ran and gave each job its solo image.
        assert cases[name]["jobs_per_s_batched"] > 0
        assert cases[name]["max_rel_err"] < 1e-5
    assert cases["lone"]["ratio"] > 0
    cold = result["cold_start"]
    assert cold["cold"]["ready_s"] > 0 and cold["warm"]["ready_s"] > 0
