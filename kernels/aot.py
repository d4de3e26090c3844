"""Ahead-of-time compilation of every kernel configuration the launchers can choose, for a CUDA target, on a
machine without a GPU: PTX, cubin, shared memory, registers and spills (from the log of Triton's own ptxas run),
whether the MMA is a Hopper `wgmma`, and for the attention kernels each loop that holds a matrix multiply: its
instructions per iteration in the disassembly (`mma_loops`) and the local loads and stores among them
(`mma_loop_spill_ops`: where spills cost every iteration).

    python -m kernels.aot --arch 90 80      # one JSON line per (kernel, config, arch)

Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .compat import FP_FUSION

# importlib: `kernels.chunk_attention` etc. are also the names of the ops that kernels/__init__ re-exports
attn_mod = importlib.import_module("kernels.chunk_attention")
rms_mod = importlib.import_module("kernels.rmsnorm")
rope_mod = importlib.import_module("kernels.rope")
swiglu_mod = importlib.import_module("kernels.swiglu")
paged_mod = importlib.import_module("kernels.paged_attention")

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@dataclass
class KernelSpec:
    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 1
    expect_wgmma: bool = False  # Hopper's warp-group MMA expected in its sm_90 PTX (no other arch has it)
    dtype: str = ""  # the data's dtype ("bfloat16", ...); "" where the kernel has none (integer checks)


def _attention_signature(dtype) -> dict[str, str]:
    """`_chunk_attention_kernel`'s runtime arguments and their types (the constexprs are added per spec)."""
    p = _PTR[dtype]
    sig = {n: p for n in ("Q", "KN", "VN", "KC", "VC", "Out")} | {"Lse": "*fp32", "StartPos": "*i32",
                                                                "start_pos": "i32", "max_len": "i32",
                                                                "window": "i32"}
    for n in ("q", "kn", "vn", "kc", "vc", "o"):
        for axis in ("b", "m", "h"):
            sig[f"stride_{n}{axis}"] = "i32"
    return sig | {"B": "i32", "C": "i32", "Hq": "i32", "qk_scale": "fp32"}


# the architectures the launchers choose tiles for (`pick_config` by compute capability): Hopper and Ampere
ARCHS = (90, 80)


def kernel_specs(arch: int = 90) -> list[KernelSpec]:
    specs = []
    cap = divmod(arch, 10)
    # every choice of the launcher over a prefix, and at prefix 0 (where a tile with no_prefix compiles without the
    # prefix loops, unsplit: there is nothing to split)
    dense = attn_mod.all_configs(cap)
    dense += [c for c in attn_mod.all_configs(cap, 0) if c not in dense]
    for d in (80, 96):  # real models' head dims that are not powers of two: padded tiles, over a prefix and none
        for prefix in (None, 0):
            c = (d, torch.bfloat16, 1, attn_mod.pick_config(4096, d, torch.bfloat16, cap, prefix=prefix))
            if c not in dense:
                dense.append(c)
    # under a sliding window the launcher picks the same tiles but for the decode-like ones (fewer load stages):
    # the window variants are compiled for the windowed choices, the others for the plain ones
    windowed = attn_mod.all_configs(cap, window=1)
    windowed += [c for c in attn_mod.all_configs(cap, 0, window=1) if c not in windowed]
    windowed += [c for c in dense if c[0] in (80, 96) and c not in windowed]
    plain = list(dense)
    dense += [c for c in windowed if c not in dense]
    # the bf16 d128 Hopper prefill tiles (128x128 over a prefix, 64x64 at prefix 0) with the softmax scale folded
    # into the exp2's multiply-add too (config fold_scale: a sweep option since an H200 timed it slower), so the
    # report sets their loops side by side
    if arch >= 90:
        folded = [(d, dt, g, {**c, "fold_scale": True}) for d, dt, g, c in plain
                  if d == 128 and dt == torch.bfloat16 and not c["pack_gqa"]
                  and (c["BLOCK_M"], c["BLOCK_N"]) == ((64, 64) if c.get("no_prefix") else (128, 128))]
        plain += folded
        dense += folded
    for head_dim, dtype, group, cfg in dense:
        has_prefix = not cfg.get("no_prefix")
        sig = _attention_signature(dtype)
        pack = attn_mod.pack_heads(group) if cfg["pack_gqa"] else 1
        # the model passes an int start (PER_ROW_START=False); the per-row variant differs by one load and is
        # compiled for the largest tile of the serving dtype below. Split-KV (any config may be split when its grid
        # leaves SMs idle) differs in the prologue and the float32 epilogue: compiled for every 16-bit config.
        per_row_too = head_dim == 128 and dtype == torch.bfloat16 and cfg["BLOCK_M"] == 128 and has_prefix
        # a sliding window (WINDOW) masks the key-block loops at the window's edge: compiled for every 16-bit
        # launcher config, unsplit and (over a prefix) split
        entry = (head_dim, dtype, group, cfg)
        win = dtype != torch.float32 and not cfg.get("fold_scale") and entry in windowed
        variants = ([(False, False, False, False)] + [(True, False, False, False)] * per_row_too + [
            (False, True, False, False)] * (dtype != torch.float32 and has_prefix)) * (entry in plain) + [
            (False, False, False, True)] * win + [(False, True, False, True)] * (win and has_prefix)
        for per_row, split, tma, window in variants:
            const = dict(GROUP=group if pack > 1 else 4, HEAD_DIM=head_dim, BLOCK_D=attn_mod.block_d(head_dim),
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                         PRECISION="ieee" if dtype == torch.float32 else "tf32", PER_ROW_START=per_row, PACK=pack,
                         SPLIT=split, TMA=tma, LONGEST_FIRST=False, HAS_PREFIX=has_prefix,
                         FOLD_SCALE=bool(cfg.get("fold_scale")), WINDOW=window, SKIP_FULL=False)
            name = (f"chunk_attention d{head_dim} {str(dtype)[6:]} m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}"
                    + (" fold" if cfg.get("fold_scale") else "") + (f" pack{pack}" if pack > 1 else "")
                    + (" per-row start" if per_row else "") + (" split" if split else "") + (" tma" if tma else "")
                    + (" window" if window else "")
                    + ("" if has_prefix else " no-prefix"))
            specs.append(KernelSpec(name, attn_mod._chunk_attention_kernel, sig | {k: "constexpr" for k in const},
                                    const, cfg["num_warps"], cfg["num_stages"],
                                    expect_wgmma=dtype != torch.float32 and cfg["BLOCK_M"] >= 64,
                                    dtype=str(dtype)[6:]))
    paged = [c for c in paged_mod.all_configs(cap) if c[1] != torch.float16 or not c[3]["pack_gqa"]]  # fp16: as bf16
    paged.append((80, torch.bfloat16, 1, paged_mod.pick_config(80, torch.bfloat16, cap)))
    for head_dim, dtype, group, tile in paged:  # the paged, varlen kernel
        pack = paged_mod.pack_heads(group) if tile["pack_gqa"] else 1
        # pages of 16 and (bf16, unpacked) 256; the split-KV variant (float32 partials) of every bf16 tile; and
        # under a sliding window (WINDOW) every bf16 tile over pages of 16, split, and unpacked over 256
        bf16 = dtype == torch.bfloat16
        variants = [(16, False, False)] + [(16, True, False)] * bf16 + [(256, False, False)] * (bf16 and pack == 1) \
            + [(16, False, True), (16, True, True)] * bf16 + [(256, False, True)] * (bf16 and pack == 1)
        for page, split, window in variants:
            cfg = paged_mod.for_page_size(tile, page)  # what the launcher launches over these pages
            p = _PTR[dtype]
            sig = {n: p for n in ("Q", "KN", "VN", "KC", "VC")} | {"Out": "*fp32" if split else p, "Lse": "*fp32",
                                                                     "BT": "*i32", "CuQ": "*i32", "Prefix": "*i32"}
            for n in ("stride_qn", "stride_qh", "stride_knn", "stride_knh", "stride_vnn", "stride_vnh", "stride_kcp",
                      "stride_kcs", "stride_kch", "stride_vcp", "stride_vcs", "stride_vch", "stride_os", "stride_on",
                      "stride_oh", "stride_bt", "max_pages", "N", "Hq"):
                sig[n] = "i32"
            sig["qk_scale"] = "fp32"
            sig["window"] = "i32"
            const = dict(GROUP=group if pack > 1 else 4, HEAD_DIM=head_dim, BLOCK_D=paged_mod.block_d(head_dim),
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PAGE_SIZE=page,
                         PRECISION="ieee" if dtype == torch.float32 else "tf32", PACK=pack, SPLIT=split,
                         PAGE_AHEAD=bool(cfg.get("page_ahead")), WINDOW=window)
            specs.append(KernelSpec(f"chunk_attention_paged d{head_dim} {str(dtype)[6:]} m{cfg['BLOCK_M']}"
                                    f"n{cfg['BLOCK_N']}" + (f" pack{pack}" if pack > 1 else "") + f" page{page}"
                                    + (" ahead" if cfg.get("page_ahead") else "") + (" split" if split else "")
                                    + (" window" if window else ""),
                                    paged_mod._paged_chunk_attention_kernel,
                                    sig | {k: "constexpr" for k in const}, const, cfg["num_warps"],
                                    cfg["num_stages"], expect_wgmma=dtype != torch.float32 and cfg["BLOCK_M"] >= 64,
                                    dtype=str(dtype)[6:]))
    if arch >= 90:  # the TMA prefix loads (config tma, Hopper only): the tiles a tuning sweep tries, alone and split
        for head_dim, cfg in attn_mod.TMA_SWEEP:
            sig = _attention_signature(torch.bfloat16)
            for split in (False, True):
                const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=attn_mod.block_d(head_dim), BLOCK_M=cfg["BLOCK_M"],
                             BLOCK_N=cfg["BLOCK_N"], PRECISION="tf32", PER_ROW_START=False, PACK=1, SPLIT=split,
                             TMA=True, LONGEST_FIRST=False, HAS_PREFIX=True, FOLD_SCALE=False, WINDOW=False,
                             SKIP_FULL=False)
                specs.append(KernelSpec(f"chunk_attention d{head_dim} bfloat16 m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}"
                                        f" w{cfg['num_warps']}s{cfg['num_stages']}" + (" split" if split else "")
                                        + " tma", attn_mod._chunk_attention_kernel,
                                        sig | {k: "constexpr" for k in const}, const, cfg["num_warps"],
                                        cfg["num_stages"], expect_wgmma=True, dtype="bfloat16"))
    if arch == 90:  # config ws (Hopper's warp specialization, sweeps): the prefix kernel of each WS_SWEEP tile, and
        # the main kernel covering the rest of the prefix and the chunk (SKIP_FULL, split) in the launcher's tiles
        # over a prefix beside it (128x128 for chunks over 512, 64x128 for shorter ones)
        for head_dim, cfg in attn_mod.WS_SWEEP:
            sig = {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "Part": "*fp32", "Lse": "*fp32", "start_pos": "i32",
                   "max_len": "i32", "B": "i32", "C": "i32", "Hq": "i32", "qk_scale": "fp32"}
            const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION="tf32",
                         WS=True)
            specs.append(KernelSpec(f"chunk_attention_ws d{head_dim} bfloat16 m{cfg['BLOCK_M']}n{cfg['BLOCK_N']} "
                                    f"w{cfg['num_warps']}s{cfg['num_stages']}", attn_mod._prefix_ws_kernel,
                                    sig | {k: "constexpr" for k in const}, const, cfg["num_warps"],
                                    cfg["num_stages"], expect_wgmma=True, dtype="bfloat16"))
        for chunk in (4096, 512):
            cfg = attn_mod.pick_config(chunk, 128, torch.bfloat16, (9, 0))
            const = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                         PRECISION="tf32", PER_ROW_START=False, PACK=1, SPLIT=True, TMA=False, LONGEST_FIRST=False,
                         HAS_PREFIX=True, FOLD_SCALE=False, WINDOW=False, SKIP_FULL=True)
            specs.append(KernelSpec(f"chunk_attention d128 bfloat16 m{cfg['BLOCK_M']}n{cfg['BLOCK_N']} ws-rest split",
                                    attn_mod._chunk_attention_kernel,
                                    _attention_signature(torch.bfloat16) | {k: "constexpr" for k in const}, const,
                                    cfg["num_warps"], cfg["num_stages"], expect_wgmma=True, dtype="bfloat16"))
    for page in (16, 256):  # the paged launcher's device-side check of rows and pages
        sig = {"BT": "*i32", "CuQ": "*i32", "Prefix": "*i32", "Ok": "*i32", "stride_bt": "i32", "max_pages": "i32",
               "num_pages": "i32", "PAGE_SIZE": "constexpr", "BLOCK": "constexpr"}
        specs.append(KernelSpec(f"chunk_attention_paged_check page{page}", paged_mod._check_rows_kernel, sig,
                                dict(PAGE_SIZE=page, BLOCK=paged_mod.CHECK_BLOCK), 4))
    for head_dim in (64, 80, 128, 256):  # the split-KV merge: float32 partials into the output's dtype
        sig = {"Part": "*fp32", "Lse": "*fp32", "Out": "*bf16"} | {
            n: "i32" for n in ("n_splits", "n_rows", "C", "Hq", "stride_ob", "stride_om", "stride_oh")}
        const = dict(HEAD_DIM=head_dim, BLOCK_D=attn_mod.block_d(head_dim), BLOCK_R=attn_mod.MERGE_ROWS)
        specs.append(KernelSpec(f"chunk_attention_merge d{head_dim} bfloat16", attn_mod._merge_splits_kernel,
                                sig | {k: "constexpr" for k in const}, const, 4, dtype="bfloat16"))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p, dt = _PTR[dtype], str(dtype)[6:]
        for hidden in (4096, 8192):
            block = triton.next_power_of_2(hidden)
            sig = {"X": p, "R": p, "W": p, "Out": p, "ROut": p, "stride_x": "i32", "stride_r": "i32",
                   "stride_o": "i32", "stride_ro": "i32", "N": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr",
                   "BLOCK": "constexpr"}
            specs.append(KernelSpec(f"add_rms_norm H{hidden} {dt}", rms_mod._add_rms_norm_kernel, sig,
                                    dict(HAS_RESIDUAL=True, BLOCK=block), min(16, max(1, block // 256)), dtype=dt))
        for half in (32, 40, 64):  # D = 64, 80 (padded), 128
            sig = {"X": p, "Cos": "*fp32", "Sin": "*fp32", "Out": p, "Pos": "*i32"} | {
                n: "i32" for n in ("stride_xb", "stride_xm", "stride_xh", "stride_ob", "stride_om", "stride_oh",
                                   "stride_t", "C", "H", "start_pos")} | {
                "HALF": "constexpr", "BLOCK_HALF": "constexpr", "BLOCK_H": "constexpr", "POSITIONS": "constexpr"}
            for positions in (False, True):
                specs.append(KernelSpec(f"rope D{2 * half} {dt}" + (" positions" if positions else ""),
                                        rope_mod._rope_kernel, sig,
                                        dict(HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
                                             BLOCK_H=rope_mod.rope_head_block(32 + 8, half),  # q's + k's heads
                                             POSITIONS=positions), 4, dtype=dt))
        sig = {"G": p, "U": p, "Out": p, "stride_g": "i32", "stride_u": "i32", "stride_o": "i32", "N": "i32",
               "BLOCK": "constexpr"}
        specs.append(KernelSpec(f"swiglu {dt}", swiglu_mod._swiglu_kernel, sig, dict(BLOCK=4096), 8, dtype=dt))
    return specs


def _ptxas(arch: int) -> str:
    """The ptxas that Triton itself uses for this arch (its bundled ones; the API differs across 3.6-3.9)."""
    from triton.backends.nvidia import compiler as nv
    try:
        return nv.get_ptxas(arch).path
    except TypeError:
        return nv.get_ptxas().path


def ptxas_report(log: str) -> dict:
    """Registers and spill bytes from the `ptxas -v` log of a compile (`_compile`). A log without a register count
    is an error, not a clean report: no figure may pass for zero spills unread."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas -v log (Triton printed: {log[-500:]!r})")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)) if spills else 0,
                spill_loads=int(spills.group(2)) if spills else 0)


def _compile(src: ASTSource, arch: int, options: dict):
    """triton.compile for `arch`, and the `-v` log of the ptxas run Triton makes itself (so the report has its flags,
    e.g. `--regAllocOptLevel=2` under Triton 3.9): in a cache of its own, which makes ptxas run, with the log that
    knobs.nvidia.dump_ptxas_log prints caught (Triton's knobs, restored on leaving their scopes)."""
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), knobs.nvidia.scope(), \
            contextlib.redirect_stdout(io.StringIO()) as log:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel, log.getvalue()


def mma_loops(cubin: bytes, arch: int) -> list[list[str]] | None:
    """The opcodes of each loop of the compiled code (nvdisasm, bundled with Triton, on the cubin) that holds a matrix
    multiply (HMMA / HGMMA: the attention kernels' key-block loops), in code order: the hot loops, whose length and
    local-memory traffic (spills) no register count shows. None without nvdisasm."""
    nvdisasm = Path(_ptxas(arch)).with_name("nvdisasm")
    if not nvdisasm.exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cubin").write_bytes(cubin)
        res = subprocess.run([str(nvdisasm), "-c", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    if res.returncode:
        return None
    code, label_at, pending = [], {}, []  # (address, instruction); label -> the address of its first instruction
    for line in res.stdout.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if ins:
            addr = int(ins.group(1), 16)
            code.append((addr, ins.group(2)))
            label_at.update((name, addr) for name in pending)
            pending = []
    loops = []
    for addr, text in code:  # a loop: a branch back to a label before it
        target = re.search(r"\bBRA\b.*\.(L_x_\d+)", text)
        if target and label_at.get(target.group(1), addr + 1) <= addr:
            body = [t for a, t in code if label_at[target.group(1)] <= a <= addr]
            opcodes = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]  # past a predicate
            if any("MMA" in op for op in opcodes):
                loops.append(opcodes)
    return loops


def _loop_report(loops: list[list[str]] | None) -> dict:
    """`mma_loops`: instructions per iteration of each loop, and its local loads and stores (LDL / STL: spills)."""
    if loops is None:
        return dict(mma_loops=None, mma_loop_spill_ops=None)
    return dict(mma_loops=[len(ops) for ops in loops],
                mma_loop_spill_ops=[sum(op.split(".")[0] in ("LDL", "STL") for op in ops) for ops in loops])


# Triton 3.7-3.9 run ptxas with `--regAllocOptLevel=2` ("to work around ptxas 13.x bug", their compiler.py); from
# 3.8 on, the Hopper attention tiles of 128 keys per block at head dims 80-128 (64x128, 128x128: the launcher's
# prefill tiles) then spill at 255 registers: 8-92 B under 3.8, 8-208 B under 3.9, up to 36 local loads/stores per
# iteration of a key-block loop (the same PTX without the flag spills nothing; 3.6 and 3.7 builds spill nothing:
# bench/results/aot-quick). The sliding-window variants (WINDOW: the window's mask in the prefix and chunk loops)
# reach 255 registers at more tiles there: the 128-key tiles again, and the 128x64 tile at d64 (68 B), none under 3.6
# or 3.7. Allowed there up to this many bytes each way, and nowhere else.
SPILL_ALLOWANCE_BYTES = 256


def spill_allowance(spec: KernelSpec, arch: int, triton_version: str = triton.__version__) -> int:
    """Spill bytes (stores, and loads) a compile of `spec` may show without failing the check: SPILL_ALLOWANCE_BYTES
    for the dense attention kernel's 128-key tiles at head dims 80-128, and its sliding-window variants, on sm_90
    under Triton 3.8 or later, else 0."""
    major, minor = (int(v) for v in re.findall(r"\d+", triton_version)[:2])
    c = spec.constexprs
    if (major, minor) >= (3, 8) and arch == 90 and spec.fn is attn_mod._chunk_attention_kernel \
            and (c.get("WINDOW") or (c.get("BLOCK_N") == 128 and 80 <= c.get("HEAD_DIM", 0) <= 128)):
        return SPILL_ALLOWANCE_BYTES
    return 0


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    # As at run time, where Triton specialises them: pointers and strides are 16-aligned (D >= 16), which is what
    # lets the compiler vectorise loads. Without these hints the code is not what a GPU would run.
    aligned = [i for i, (name, ty) in enumerate(spec.signature.items())
               if ty.startswith("*") or name.startswith("stride_")]
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel, log = _compile(src, arch, dict(num_warps=spec.num_warps, num_stages=spec.num_stages,
                                           enable_fp_fusion=FP_FUSION))  # as every launch asks
    ptx = kernel.asm["ptx"]
    has_dot = "BLOCK_N" in spec.constexprs  # the attention kernels (the others have no matrix multiply to find)
    return dict(kernel=spec.name, arch=f"sm_{arch}", num_warps=spec.num_warps, num_stages=spec.num_stages,
                compiled_warps=kernel.metadata.num_warps, setmaxnreg="setmaxnreg" in ptx,
                shared_bytes=kernel.metadata.shared, wgmma="wgmma" in ptx,
                expect_wgmma=spec.expect_wgmma and arch == 90,
                tma="cp.async.bulk.tensor" in ptx,
                cubin_bytes=len(kernel.asm["cubin"]),
                **_loop_report(mma_loops(kernel.asm["cubin"], arch) if has_dot else None),
                **ptxas_report(log), spill_allowed=spill_allowance(spec, arch))


def selected_specs(arch: int, only: str = "", quick: bool = False) -> list[KernelSpec]:
    """The specs whose name contains `only`; with `quick`, attention in bf16 at every head dim and in the other
    dtypes at d128 only, and the paged kernel's split variants at d128 only (the split adds the same prologue and
    epilogue to every tile)."""
    def skipped(name: str) -> bool:
        if not name.startswith("chunk_attention") or " d128 " in name or name.startswith("chunk_attention_paged_check"):
            return False
        return "bfloat16" not in name or (name.startswith("chunk_attention_paged ") and " split" in name)
    return [spec for spec in kernel_specs(arch) if only in spec.name and not (quick and skipped(spec.name))]


def _code_path(spec: KernelSpec) -> tuple[tuple, bool] | None:
    """The code path a spec stands for in `ci_specs`, and whether the path's largest tile (the most registers, where
    spills start) represents it, or its smallest (a compile check); None: left to the quick set."""
    c = spec.constexprs
    kernel = spec.name.split()[0]
    if "BLOCK_N" not in c:  # the split-KV merge, the paged row check, the elementwise kernels: each in bf16 only
        return ((spec.name,), False) if spec.dtype in ("bfloat16", "") else None
    if kernel == "chunk_attention_ws" or c.get("SKIP_FULL"):  # config ws (sweeps): every tile (few, and the
        return (kernel, "ws", c["BLOCK_M"], c["BLOCK_N"]), True  # specialization is checked per tile)
    if c.get("FOLD_SCALE") or c.get("TMA"):  # tuning-sweep options, never the launchers' choice
        return (kernel, "fold" if c.get("FOLD_SCALE") else "tma"), False
    if c.get("WINDOW"):  # a sliding window: the largest d128 windowed tile of each kernel (the quick set: all)
        return ((kernel, "window"), True) if spec.dtype == "bfloat16" and c["HEAD_DIM"] == 128 else None
    if spec.dtype != "bfloat16":  # fp16 tiles are bf16's; the fp32 ones are for checking
        return (kernel, spec.dtype), False
    if c["HEAD_DIM"] != 128:  # every other head dim: its largest tile, whatever the variant
        return (kernel, c["HEAD_DIM"]), True
    variant = (c["PACK"] > 1, c["SPLIT"], c.get("PER_ROW_START", False), c.get("HAS_PREFIX", True),
               c.get("PAGE_SIZE", 16), c.get("PAGE_AHEAD", False))
    if variant == (False, False, False, True, 16, False):  # d128's plain tiles: every shape the launcher picks
        return (kernel, 128, c["BLOCK_M"], c["BLOCK_N"]), True
    return (kernel, 128, variant), True  # d128's variants: GQA packing, split-KV, per-row starts, prefix 0, pages


def ci_specs(arch: int) -> list[KernelSpec]:
    """The test suite's selection (`--ci`): of the quick set, one spec per code path (`_code_path`). At d128 every
    bf16 tile shape the launchers pick and the largest tile of each variant (GQA packing, split-KV, per-row starts,
    prefix 0, pages of 256); every other head dim's largest bf16 tile; fp16, fp32 and the sweep-only options (fold,
    TMA) by one small tile each; the small kernels in bf16. About a third of the quick set's compile time: `--quick`
    (or the full set) is the check to run after changing a kernel."""
    specs = selected_specs(arch, quick=True)
    paths: dict[tuple, list[KernelSpec]] = {}
    for spec in specs:
        if (path := _code_path(spec)) is not None:
            paths.setdefault(path, []).append(spec)

    def size(spec):  # ties: the plainer tile (unpacked, unsplit)
        c = spec.constexprs
        return c.get("BLOCK_M", 0) * c.get("BLOCK_N", 0), spec.num_warps, c.get("PACK", 1) == 1, not c.get("SPLIT")

    chosen = {id(max(group, key=size) if largest else min(group, key=size)) for (_, largest), group in paths.items()}
    return [spec for spec in specs if id(spec) in chosen]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as `python -m bench` says it, not the usage block first
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _arch(text: str) -> int:
    """A compute capability as nvcc and Triton spell it: 90, sm_90 or sm90 (any case)."""
    t = text.strip().lower()
    t = t[3:] if t.startswith("sm_") else t[2:] if t.startswith("sm") else t
    if not t.isdigit() or int(t) not in ARCHS:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(f'{a} (sm_{a})' for a in ARCHS)}, got {text!r}")
    return int(t)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0],
                 allow_abbrev=False)  # `--qu` is not `--quick`: options in full, as in the docs
    ap.add_argument("--arch", type=_arch, nargs="+", default=[90, 80], metavar="ARCH",
                    help="compute capabilities: 90 (Hopper), 80 (Ampere), also spelled sm_90, sm_80; default both")
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this text")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="attention in bf16 at every head dim, fp16/fp32 at d128 only (fp16 tiles equal bf16's)")
    which.add_argument("--ci", action="store_true",
                       help="the test suite's selection: one compile per code path of the quick set (see ci_specs)")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="compile only every N-th of the selected kernels, from the I-th (0-based): N processes share "
                         "the work")
    ap.add_argument("--list", action="store_true", help="print the selected kernels' names, compile nothing")
    args = ap.parse_args(argv)
    args.arch = list(dict.fromkeys(args.arch))  # `--arch 90 sm_90` compiles sm_90 once
    try:
        shard, shards = (int(v) for v in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        ap.error(f"--shard takes I/N with 0 <= I < N, got {args.shard!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.aot: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    failed = 0
    for arch in args.arch:
        specs = [s for s in ci_specs(arch) if args.only in s.name] if args.ci else selected_specs(arch, args.only,
                                                                                                   args.quick)
        if not specs:  # a typo in --only would otherwise pass as a clean report of nothing
            print(f"kernels.aot: no kernel for sm_{arch} has {args.only!r} in its name (--list without --only "
                  f"prints the names)", file=sys.stderr)
            return 2
        for spec in specs[shard::shards]:
            if args.list:
                print(json.dumps(dict(kernel=spec.name, arch=f"sm_{arch}")))
                continue
            try:
                row = compile_spec(spec, arch)
            except Exception as e:  # report every failure, keep going
                row = dict(kernel=spec.name, arch=f"sm_{arch}", error=f"{type(e).__name__}: {str(e)[:500]}")
                failed += 1
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit, where a reader gone would be Python's "Exception ignored" and 120
        sys.exit(code)
    except BrokenPipeError:  # `--list | head` has read what it wanted: stop quietly, as `cat` would (SIGPIPE's 141)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
