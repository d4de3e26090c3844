"""The kernels compile ahead of time for Hopper (sm_90) and Ampere (sm_80) without a GPU, with no register spills (by
the log of Triton's own ptxas run; Triton 3.8+ builds of the Hopper prefill tiles: `spill_allowance`), and the
attention kernel's sm_90 PTX uses wgmma: one compile per code path (`python -m kernels.aot --ci`, a third of the
quick set's compile time); the selections themselves are checked to cover every configuration the launchers choose.
After changing a kernel, run `python -m kernels.aot --quick` (or the full set)."""
from __future__ import annotations

import json
import os
import re
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
    assert "TRITON_DEFAULT_FP_FUSION" not in res.stderr  # Triton 3.9 warns where a compile leaves fusion unsaid
    return rows


def test_every_launch_asks_for_fp_fusion_explicitly():
    """Triton 3.10 turns FP fusion off by default (3.9 warns): every kernel launch in kernels/ and pipeline/ passes
    enable_fp_fusion (kernels.compat.FP_FUSION), so the code a GPU runs does not change with the release, whether it
    launches the kernel itself or through a `kernels.fast_launch.DirectLaunch` (`*_LAUNCH`). Read from the source: most
    of these launches run only on a GPU."""
    import ast
    launches = []
    for path in sorted((ROOT / "kernels").glob("*.py")) + sorted((ROOT / "pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith(("_kernel", "LAUNCH")):
                named = {k.arg for k in node.keywords}
                splats = [k.value.id for k in node.keywords if k.arg is None and isinstance(k.value, ast.Name)]
                launches.append((f"{path.name}:{node.lineno}", "enable_fp_fusion" in named or splats))
    assert len(launches) >= 10
    assert [where for where, asks in launches if not asks] == []
    from pipeline.link import _WAIT_OPTIONS  # the one launch that passes its options as **
    assert _WAIT_OPTIONS["enable_fp_fusion"] is True


# each arch in two shards: the longest compiles of the suite, shared between the xdist workers
AOT_RUNS = [("90", ["--ci"], "0/2"), ("90", ["--ci"], "1/2"), ("80", ["--ci"], "0/2"), ("80", ["--ci"], "1/2")]


@pytest.mark.parametrize("arch,extra,shard", AOT_RUNS, ids=["sm90-shard0", "sm90-shard1", "sm80-shard0",
                                                             "sm80-shard1"])
def test_kernels_compile_for_gpu_without_spills(arch, extra, shard):
    rows = compile_rows("--arch", arch, *extra, "--shard", shard)
    i, n = (int(v) for v in shard.split("/"))
    wanted = [r["kernel"] for r in compile_rows("--arch", arch, *extra, "--list")]
    assert [r["kernel"] for r in rows] == wanted[i::n]  # every kernel of the shard reported, errors included
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    # none, but where Triton's own ptxas flags make the launcher's Hopper prefill tiles spill (`spill_allowance`)
    spills = [(r["kernel"], r["spill_stores"], r["spill_loads"]) for r in rows
              if max(r["spill_stores"], r["spill_loads"]) > r["spill_allowed"]]
    assert not spills, f"register spills: {spills}"
    # wgmma where expected (Hopper's 16-bit tiles of 64+ query rows), never on sm_80 (it has no wgmma)
    assert [r["kernel"] for r in rows if r["expect_wgmma"] != r["wgmma"]] == []
    assert any(r["expect_wgmma"] for r in rows) == (arch == "90")
    if arch == "90":
        no_tma = [r["kernel"] for r in rows if r["kernel"].endswith(" tma") and not r["tma"]]
        assert not no_tma, f"no TMA copies (cp.async.bulk.tensor) in {no_tma}"
    # config ws: Triton's Hopper pass made each prefix kernel's 4 warps a producer and two consumer groups (12, their
    # registers moved by setmaxnreg); nothing else is specialized
    ws = [r for r in rows if r["kernel"].startswith("chunk_attention_ws ")]
    assert all(r["compiled_warps"] == 12 and r["setmaxnreg"] and r["tma"] for r in ws), ws
    assert not [r["kernel"] for r in rows if r not in ws and (r["setmaxnreg"] or r["compiled_warps"] != r["num_warps"])]
    # the disassembly's key-block loops: every 16-bit attention kernel has some (fp32 dots are FMAs, no MMA)
    no_loops = [r["kernel"] for r in rows if r["kernel"].startswith("chunk_attention ") and "float32" not in
                r["kernel"] and not r["mma_loops"]]
    assert not no_loops, f"no matrix-multiply loop found in {no_loops}"
    assert all(n > 0 for r in rows for n in r["mma_loops"] or [])
    # the loops' local loads and stores (LDL / STL) are spills: none in a kernel that spills nothing
    assert not [r["kernel"] for r in rows if not (r["spill_stores"] or r["spill_loads"]) and any(
        r["mma_loop_spill_ops"] or [])]


def test_the_compiled_selection_covers_every_kernel():
    # listed by kernels.aot itself: in this process TRITON_INTERPRET would pick the interpreter's tiles
    names = [r["kernel"] for r in compile_rows("--arch", "90", "--quick", "--list")]
    assert {n.split()[0] for n in names} == {"chunk_attention", "chunk_attention_merge", "chunk_attention_paged",
                                             "chunk_attention_paged_check", "chunk_attention_ws", "add_rms_norm",
                                             "rope", "swiglu"}
    # the paged, varlen kernel: every head dim in bf16, small and large pages, a padded head dim
    paged = {n for n in names if n.startswith("chunk_attention_paged ")}
    assert {f"d{d}" for d in (16, 32, 64, 80, 128, 256)} <= {n.split()[1] for n in paged if "bfloat16" in n}
    assert {w for n in paged for w in n.split() if w.startswith("page")} == {"page16", "page256"}
    # and its GQA-packed tiles, and the split-KV variant of every bf16 tile (at d128 in the quick selection)
    assert any(" pack" in n for n in paged)
    assert {n + " split" for n in paged if "bfloat16 " in n and " d128 " in n and "page16" in n
            and not n.endswith((" split", " window"))} <= paged
    full = {r["kernel"] for r in compile_rows("--arch", "90", "--only", "paged", "--list")}
    assert {n + " split" for n in full if "bfloat16 " in n and "page16" in n
            and not n.endswith((" split", " window"))} <= full
    # under a sliding window: every bf16 tile over pages of 16, and split
    windowed = {n[:-len(" window")] for n in full if n.endswith(" window")}
    assert {n for n in full if "bfloat16 " in n and n.endswith("page16")} <= windowed
    assert {n + " split" for n in windowed if n.endswith("page16")} <= windowed
    # GQA-packed decode tiles and the split-KV variant of every 16-bit tile (any grid that leaves SMs idle splits)
    assert any(" pack" in n for n in names)
    plain = {n for n in names if n.startswith("chunk_attention ") and "float32" not in n and not n.endswith(
        (" split", " per-row start", " tma", " no-prefix", " window"))}
    assert {n + " split" for n in plain} <= set(names)
    # and the sliding-window variant of every 16-bit tile the launcher picks, unsplit and split
    assert {n + " window" for n in plain if " fold" not in n} | {n + " split window" for n in plain
                                                                 if " fold" not in n} <= set(names)
    assert any(n.startswith("chunk_attention d128 bfloat16") for n in names)
    assert any(n.endswith("per-row start") for n in names)  # the start-position tensor variant
    # the prefix-0 tile, compiled without the prefix loops (unsplit: nothing to split), padded head dims too
    no_prefix = [n for n in names if n.endswith(" no-prefix")]
    assert {"chunk_attention d128 bfloat16 m64n64 no-prefix",
            "chunk_attention d80 bfloat16 m64n64 no-prefix"} <= set(no_prefix) and not any(" split" in n
                                                                                  for n in no_prefix)
    # the d128 Hopper prefill tiles with the softmax scale in the exp2's multiply-add too (config fold_scale, a
    # sweep option), split too; the launcher's own tiles do not fold
    assert {"chunk_attention d128 bfloat16 m128n128 fold", "chunk_attention d128 bfloat16 m128n128 fold split",
            "chunk_attention d128 bfloat16 m64n64 fold no-prefix", "chunk_attention d128 bfloat16 m128n128",
            "chunk_attention d128 bfloat16 m64n64 no-prefix"} <= set(names)
    assert not [n for n in names if " fold" in n and " d128 " not in n]
    # the paged Hopper d128 tile reads its block table ahead over pages of 256 only (a key block in one page)
    assert {"chunk_attention_paged d128 bfloat16 m64n64 page16", "chunk_attention_paged d128 bfloat16 m64n64 page16 "
            "split", "chunk_attention_paged d128 bfloat16 m64n64 page256 ahead"} <= paged
    assert not [n for n in paged if "page16" in n and " ahead" in n]
    tma = [n for n in names if n.endswith(" tma")]  # the TMA prefix loads, alone and split, on sm_90 only
    assert any(" d128 " in n for n in tma) and any(" split tma" in n for n in tma)
    assert not [r for r in compile_rows("--arch", "80", "--quick", "--list") if r["kernel"].endswith(" tma")
                or r["kernel"].startswith("chunk_attention_ws") or " ws-rest" in r["kernel"]]
    # config ws (sm_90 only): the warp-specialized prefix kernel of each sweep tile, and the main kernel's rest of the
    # prefix and chunk in the launcher's two prefill tiles over a prefix
    assert {"chunk_attention_ws d128 bfloat16 m128n128 w4s2", "chunk_attention_ws d128 bfloat16 m128n64 w4s3",
            "chunk_attention d128 bfloat16 m128n128 ws-rest split",
            "chunk_attention d128 bfloat16 m64n128 ws-rest split"} <= set(names)
    assert {f"d{d}" for d in (16, 32, 64, 128, 256)} <= {n.split()[1] for n in names if "bfloat16" in n}
    ampere = [r["kernel"] for r in compile_rows("--arch", "80", "--only", "d128", "--list")]
    assert any(n.startswith("chunk_attention d128 bfloat16") for n in ampere)


def test_the_report_reads_tritons_ptxas_log_and_allows_spills_only_where_its_flags_cause_them():
    from kernels import aot
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\nptxas info    : Function properties for _k\n"
           "    104 bytes stack frame, 104 bytes spill stores, 116 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 104 bytes cumulative stack size\n")
    assert aot.ptxas_report(log) == dict(registers=255, spill_stores=104, spill_loads=116)
    assert aot.ptxas_report("ptxas info    : Used 40 registers\n") == dict(registers=40, spill_stores=0, spill_loads=0)
    with pytest.raises(RuntimeError, match="no register count"):  # an empty log is no clean report
        aot.ptxas_report("")
    dense, paged = aot.attn_mod._chunk_attention_kernel, aot.paged_mod._paged_chunk_attention_kernel

    def spec(fn, d, n, window=False):  # in this process the interpreter's tiles stand in for the GPU's: by hand
        return aot.KernelSpec(f"d{d} n{n}", fn, {}, dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=n, WINDOW=window), 8)
    prefill = spec(dense, 128, 128)
    assert aot.spill_allowance(prefill, 90, "3.9.0") == aot.spill_allowance(prefill, 90, "3.8.1") > 0
    assert aot.spill_allowance(prefill, 90, "3.7.0") == aot.spill_allowance(prefill, 90, "3.6.0") == 0
    assert aot.spill_allowance(prefill, 80, "3.9.0") == 0
    assert aot.spill_allowance(spec(dense, 80, 128), 90, "3.9.0") > 0
    for fn, d, n in ((dense, 128, 64), (dense, 64, 128), (dense, 256, 128), (paged, 128, 128)):
        assert aot.spill_allowance(spec(fn, d, n), 90, "3.9.0") == 0, (fn.__name__, d, n)
    # the dense kernel's sliding-window variants, any tile, under the same Triton builds and arch only
    windowed = spec(dense, 64, 64, window=True)
    assert aot.spill_allowance(windowed, 90, "3.9.0") > 0
    assert aot.spill_allowance(windowed, 90, "3.7.0") == aot.spill_allowance(windowed, 80, "3.9.0") == 0
    assert aot.spill_allowance(spec(paged, 64, 64, window=True), 90, "3.9.0") == 0


def _tile(name: str) -> int:
    m, n = re.search(r" m(\d+)n(\d+)", name).groups()
    return int(m) * int(n)


@pytest.mark.parametrize("arch", ["90", "80"])
def test_the_tests_selection_keeps_every_code_path_of_the_quick_set(arch):
    ci = [r["kernel"] for r in compile_rows("--arch", arch, "--ci", "--list")]
    quick = [r["kernel"] for r in compile_rows("--arch", arch, "--quick", "--list")]
    assert len(set(ci)) == len(ci) and ci == [n for n in quick if n in set(ci)]  # a subset, in the quick set's order
    assert len(ci) < len(quick) / 2
    assert {n.split()[0] for n in ci} == {n.split()[0] for n in quick}  # every kernel
    attention = ("chunk_attention ", "chunk_attention_paged ")
    small = [n for n in quick if not n.startswith(attention)]
    assert [n for n in small if "float" not in n or "bfloat16" in n] == [n for n in ci if not n.startswith(attention)]
    for kernel in attention:
        mine = [n for n in ci if n.startswith(kernel)]
        theirs = [n for n in quick if n.startswith(kernel)]
        # every head dim in bf16, by the largest tile the launcher picks for it (where spills start)
        for d in {n.split()[1] for n in theirs}:
            tiles = [n for n in theirs if n.split()[1] == d and "bfloat16" in n and not n.endswith(" tma")
                     and " fold" not in n]
            picked = [n for n in mine if n.split()[1] == d and "bfloat16" in n and not n.endswith(" tma")
                      and " fold" not in n]
            assert picked and max(map(_tile, picked)) == max(map(_tile, tiles)), (d, picked)
        # d128: every plain bf16 tile shape, and each variant somewhere
        plain = re.compile(kernel + r"d128 bfloat16 m\d+n\d+( page16)?$")
        assert [n for n in theirs if plain.match(n)] == [n for n in mine if plain.match(n)]
        for word in (" pack", " split", " per-row start", " no-prefix", " page256", " ahead", " fold", " tma",
                     " window", " float16 ", " float32 "):
            assert any(word in n for n in mine) == any(word in n for n in theirs), word


def test_a_selection_of_nothing_is_an_error_not_an_empty_report():
    """A typo in --only would print no rows and exit 0, like a clean report: it exits 2 with one line instead."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "90", "--only", "chunk_atention", "--list"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and not res.stdout
    assert res.stderr.strip() == ("kernels.aot: no kernel for sm_90 has 'chunk_atention' in its name (--list without "
                                  "--only prints the names)")


def test_an_arch_is_taken_as_nvcc_and_triton_spell_it():
    """`--arch sm_90` as nvcc's `-arch sm_90` spells it, or `90`; each arch once however often it is named."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "SM_90", "sm80", "90", "--only", "swiglu",
                          "--list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    archs = [json.loads(line)["arch"] for line in res.stdout.splitlines()]
    assert archs and set(archs) == {"sm_90", "sm_80"} and archs == sorted(archs, reverse=True)
    assert archs.count("sm_90") == archs.count("sm_80")


@pytest.mark.parametrize("args,line", [
    (["--arch", "70"], "argument --arch: expected 90 (sm_90) or 80 (sm_80), got '70'"),
    (["--arch", "sm_75"], "argument --arch: expected 90 (sm_90) or 80 (sm_80), got 'sm_75'"),
    (["--qu"], "unrecognized arguments: --qu"),  # no abbreviations: `--qu` is not `--quick`
    (["--shard", "3/2"], "--shard takes I/N with 0 <= I < N, got '3/2'"),
])
def test_bad_options_are_one_line(args, line):
    res = subprocess.run([sys.executable, "-m", "kernels.aot", *args, "--list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and not res.stdout
    assert res.stderr == f"python -m kernels.aot: {line} (see --help)\n"


def _ptx_of_link_kernel(name: str, signature: dict) -> list[str]:
    """PTX lines of one of pipeline.link's small wait kernels, compiled for sm_90 in a process of its own."""
    code = ("import triton\nfrom triton.compiler import ASTSource\nfrom triton.backends.compiler import GPUTarget\n"
            f"from pipeline.link import {name}\n"
            f"k = triton.compile(ASTSource(fn={name}, signature={signature!r}, constexprs={{}}),"
            " target=GPUTarget('cuda', 90, 32), options=dict(enable_fp_fusion=True))\nprint(k.asm['ptx'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.splitlines()


def _rereads_in_a_loop(lines: list[str], is_read) -> bool:
    """At least two reads (one before the loop, one in it) and a branch back after the last one."""
    reads = [i for i, line in enumerate(lines) if is_read(line)]
    branches = [i for i, line in enumerate(lines) if line.strip().startswith("@") and " bra " in line]
    return len(reads) >= 2 and any(b > reads[-1] for b in branches)


def test_emulated_link_wait_kernel_reads_the_global_timer_in_its_loop():
    """The GPU link emulation waits on %globaltimer (wall nanoseconds), not SM cycles, and re-reads it each turn."""
    lines = _ptx_of_link_kernel("_wait_ns_kernel", {"ns": "i64"})
    assert _rereads_in_a_loop(lines, lambda line: "%globaltimer" in line)


def test_emulated_link_wait_kernel_is_one_kernel_for_every_delay():
    """The delay is not specialized on (Triton would otherwise compile, and load mid-run, a variant for delays of 1
    or divisible by 16 ns): the link loads its one wait kernel before any run (`preload_link_kernels`)."""
    code = ("from pipeline.link import _wait_ns_kernel as k\n"
            "print([(p.name, p.do_not_specialize) for p in k.params])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled JIT, not the interpreter
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[('ns', True)]"
