"""Shared fixtures: small Hugging Face checkpoints written with transformers' save_pretrained; CUDA graph
captures emulated on CPU."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Property tests draw the same examples on every run (a failure reproduces; no example database is written):
# HYPOTHESIS_PROFILE=explore draws new ones each run, to search further.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
# Without a GPU the Triton kernels run in Triton's interpreter. Must be set before `kernels` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def read_state(path) -> dict:
    """A safetensors file's tensors, copied: `load_file` maps the file, and a test that rewrites the same file
    while holding mapped tensors reads a truncated file (SIGBUS under safetensors 0.4, which writes in place)."""
    from safetensors.torch import load_file
    return {name: t.clone() for name, t in load_file(path).items()}


def make_hf_checkpoint(directory, model_type="llama", gqa=True, tied=False, layers=3, **extra):
    """Random-weight HF model saved to `directory`; returns the HF model (eval, float32)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x would save rope_parameters and not apply them
        pytest.fail(f"the tests' checkpoints need transformers >= 5 (pyproject.toml's test extra), found "
                    f"{transformers.__version__}: pip install -e '.[test]'")
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
    }[model_type]
    if model_type in ("phi3", "smollm3"):  # their default pad tokens are outside this small vocabulary
        extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **extra}
    torch.manual_seed(1234)
    cfg = cls_cfg(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=1 if gqa else 4, intermediate_size=96, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5, **extra)
    model = cls_model(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones and biases to zeros: perturb them so that a swapped
        for name, p in model.named_parameters():  # norm weight or an ignored bias changes the logits
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no GPU on this machine")
    return torch.device("cuda")


def need_gpus(n: int) -> None:
    """Skips a test that runs one process per stage (and TP rank) on GPUs of its own, NCCL between them."""
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs (one process each, NCCL between them); {torch.cuda.device_count()} here")


def run_python_apart(code: str, timeout: int = 300):
    """`code` (dedented) run by this Python in a process of its own at the repository root: for checks that leave
    the process unusable, such as a CUDA device-side assert. Returns the CompletedProcess (stdout, stderr text)."""
    import pathlib
    import subprocess
    import sys
    import textwrap
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(pathlib.Path(__file__).resolve().parents[1]))


class _Replays:
    """A CUDA graph's replay, emulated on CPU: the captured function run again on the graph's input, into its
    output."""
    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out = fn, static_in, static_out

    def replay(self):
        self.static_out.copy_(self.fn(self.static_in))


def _emulated_capture(self, fn, x):
    """`ChunkGraphs._capture` without CUDA: the eager run on a copy of x, and a 'graph' that re-runs fn."""
    static_in = x.clone()
    out = fn(static_in)
    static_out = out.clone()
    return out, (_Replays(fn, static_in, static_out), static_in, static_out)


@pytest.fixture
def emulated_graphs(monkeypatch):
    """`pipeline.graphs.ChunkGraphs` captures emulated (a replay re-runs the chunk, as a graph replays its
    kernels): the code around the capture runs on CPU."""
    from pipeline.graphs import ChunkGraphs
    monkeypatch.setattr(ChunkGraphs, "_capture", _emulated_capture)
