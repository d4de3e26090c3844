"""Kernel benchmark: chunk_attention against torch SDPA (every backend available) on the same work, and the
memory-bound kernels in GB/s against torch eager. Accuracy is checked in the same run. Needs a GPU.

    python -m bench kernels [--out bench/results/<gpu>]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def visible_pairs(C: int, P: int) -> int:
    """Query-key pairs a chunk of C queries over prefix P actually computes (bottom-right causal)."""
    return C * P + C * (C + 1) // 2


def attention_flops(B, Hq, D, C, P) -> int:
    return 4 * B * Hq * D * visible_pairs(C, P)


def bench_attention(B=1, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16,
                    shapes=((0, 256), (0, 2048), (4096, 1024), (16384, 2048), (32768, 4096))):
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import chunk_attention
    rows = []
    for P, C in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, C, Hq, D, device="cuda", dtype=dtype, generator=g)
        kn, vn = (torch.randn(B, C, Hkv, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        kc, vc = (torch.randn(B, P + C, Hkv, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        flops = attention_flops(B, Hq, D, C, P)
        ms = triton.testing.do_bench(lambda: chunk_attention(q, kn, vn, kc, vc, P))
        out = chunk_attention(q, kn, vn, kc, vc, P)
        kcat = kc[:, :P + C].transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
        vcat = vc[:, :P + C].transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
        mask = torch.arange(P + C, device="cuda")[None, :] <= P + torch.arange(C, device="cuda")[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), kcat.float(), vcat.float(),
                                                               attn_mask=mask).transpose(1, 2)
        row = dict(prefix=P, chunk=C, triton_ms=ms, triton_tflops=flops / ms / 1e9,
                   max_abs_err=(out.float() - ref).abs().max().item())
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
            qt = q.transpose(1, 2)
            try:
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kcat, vcat, attn_mask=mask)  # noqa
                    fn()
                    row[f"sdpa_{name}_ms"] = triton.testing.do_bench(fn)
            except RuntimeError as e:
                row[f"sdpa_{name}_ms"] = None
                row[f"sdpa_{name}_why"] = str(e).splitlines()[0][:200]
        best = min((v for k, v in row.items() if k.startswith("sdpa_") and k.endswith("_ms") and v), default=None)
        row["speedup_vs_best_sdpa"] = best / ms if best else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for kernels.json (default: print only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench kernels: no CUDA GPU on this machine; the kernel benchmark needs one (nothing measured).")
        print(json.dumps(dict(skipped="no CUDA GPU")))
        return 0
    rows = bench_attention()
    for r in rows:
        print(f"P={r['prefix']:>6} C={r['chunk']:>5}  triton {r['triton_ms']:.3f} ms {r['triton_tflops']:.0f} TFLOP/s"
              f"  vs best SDPA {r['speedup_vs_best_sdpa'] or float('nan'):.2f}x  err {r['max_abs_err']:.1e}")
    doc = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, attention=rows)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernels.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(dict(attention_tflops={f"P{r['prefix']}_C{r['chunk']}": round(r["triton_tflops"], 1)
                                            for r in rows})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
