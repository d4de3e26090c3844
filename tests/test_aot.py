"""Every kernel configuration the launchers can choose compiles ahead of time for Hopper (sm_90) and Ampere (sm_80)
without a GPU, with no register spills, and the attention kernel's sm_90 PTX uses wgmma."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compile_rows(*args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.aot", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows, f"kernels.aot printed no results: {res.stderr[-3000:]}"
    return rows


@pytest.mark.parametrize("arch,extra", [("90", ["--quick"]), ("80", ["--only", "d128"])])
def test_kernels_compile_for_gpu_without_spills(arch, extra):
    rows = compile_rows("--arch", arch, *extra)
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    spills = [(r["kernel"], r["spill_stores"], r["spill_loads"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, f"register spills: {spills}"
    kinds = {r["kernel"].split()[0] for r in rows}
    assert {"add_rms_norm", "rope", "swiglu"} <= kinds or extra[0] == "--only"
    assert any(r["kernel"].startswith("chunk_attention d128 bfloat16") for r in rows)
    if arch == "90":
        assert any(r["kernel"].endswith("per-row start") for r in rows)  # the start-position tensor variant
        missing = [r["kernel"] for r in rows if r["expect_wgmma"] and not r["wgmma"]]
        assert not missing, f"no wgmma in sm_90 PTX of {missing}"


def test_emulated_link_wait_kernel_reads_the_global_timer_in_its_loop():
    """The GPU link emulation waits on %globaltimer (wall nanoseconds), not SM cycles, and re-reads it each turn."""
    code = ("import triton\nfrom triton.compiler import ASTSource\nfrom triton.backends.compiler import GPUTarget\n"
            "from pipeline.link import _wait_ns_kernel\n"
            "k = triton.compile(ASTSource(fn=_wait_ns_kernel, signature={'ns': 'i64'}, constexprs={}),"
            " target=GPUTarget('cuda', 90, 32))\nprint(k.asm['ptx'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    reads = [i for i, line in enumerate(lines) if "%globaltimer" in line]
    branches = [i for i, line in enumerate(lines) if line.strip().startswith("@") and " bra " in line]
    assert len(reads) >= 2, "the timer is read once: the wait cannot end"
    assert any(b > reads[-1] for b in branches), "no loop back-edge after the timer read"
