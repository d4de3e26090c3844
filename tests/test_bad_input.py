"""Bad input, table-driven: every subcommand of the CLI and every public function refuses it before any work, with
one line that names the bad value and what is allowed. CLI: a non-zero exit, exactly one line on stderr, no
traceback, no output files, within seconds. API: a ValueError or TypeError whose message is one line."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import PipelineSpec
from tests.conftest import make_hf_checkpoint, read_state

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--prompt-len", "64"]

# ---- broken checkpoints ------------------------------------------------------------------------------------------


def _config(d: Path, **change):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _tensors(d: Path, fn):
    state = read_state(d / "model.safetensors")
    fn(state)
    save_file(state, d / "model.safetensors")


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _index_with_missing_shard(d: Path):
    state = read_state(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    save_file(state, d / "part1.safetensors")
    weight_map = {n: "part1.safetensors" for n in state} | {"model.layers.1.mlp.down_proj.weight": "part2.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BROKEN = {
    "no-config": lambda d: (d / "config.json").unlink(),
    "no-heads": lambda d: _config(d, num_attention_heads=None),
    "heads-text": lambda d: _config(d, num_attention_heads="four"),
    "bad-json": lambda d: (d / "config.json").write_text("{not json"),
    "gpt2": lambda d: _config(d, model_type="gpt2"),
    "dynamic": lambda d: _config(d, rope_parameters={"rope_type": "dynamic", "factor": 4.0}),
    "no-weights": lambda d: (d / "model.safetensors").unlink(),
    "pickle": lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
    "truncated": _truncate,
    "o-bias": lambda d: _tensors(d, lambda s: s.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.ones(64))),
    "int8": lambda d: _tensors(d, lambda s: s.__setitem__("model.layers.0.mlp.up_proj.weight",
                                                         torch.zeros(96, 64, dtype=torch.int8))),
    "shape": lambda d: _tensors(d, lambda s: s.__setitem__("model.norm.weight", torch.ones(65))),
    "missing": lambda d: _tensors(d, lambda s: s.pop("model.layers.1.mlp.down_proj.weight")),
    "missing-shard": _index_with_missing_shard,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> a directory holding a 2-layer Llama checkpoint broken that way ("good": not broken)."""
    root = tmp_path_factory.mktemp("checkpoints")
    make_hf_checkpoint(root / "good", layers=2)
    out = {"good": root / "good"}
    for kind, breaks in BROKEN.items():
        shutil.copytree(root / "good", root / kind)
        breaks(root / kind)
        out[kind] = root / kind
    (root / "a-file").write_text("not a directory")
    out["a-file"] = root / "a-file"
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoints):
    """Files a user might hand to compare and gpu-suite by mistake."""
    root = tmp_path_factory.mktemp("files")
    (root / "not-json.json").write_text("hello")
    (root / "other.json").write_text(json.dumps({"a": 1}))
    (root / "no-points.json").write_text(json.dumps({"schema_version": 1, "environment": {}, "config": {},
                                                     "points": []}))
    (root / "list.json").write_text("[1, 2]")
    (root / "kernels.json").write_text(json.dumps({"schema_version": 1, "kind": "kernels", "attention": [],
                                                   "memory_bound": []}))
    (root / "suite-corrupt").mkdir()
    (root / "suite-corrupt" / "kernels.json").write_text("{truncated")
    (root / "suite-empty").mkdir()
    (root / "suite-noenv").mkdir()
    (root / "suite-noenv" / "tests.json").write_text(json.dumps({"passed": 3}))
    return root


# ---- the CLI -----------------------------------------------------------------------------------------------------
# (id, argv, what the one line must say). {ckpt:KIND} is a broken checkpoint, {file:NAME} a file above, {out} a
# fresh output directory that must not be created.

CLI = [
    # python -m bench: every option
    ("stages-0", [*TINY, "--stages", "0"], ["--stages", "positive integer", "got 0"]),
    ("stages-negative", [*TINY, "--stages", "-1"], ["--stages", "positive integer"]),
    ("stages-text", [*TINY, "--stages", "two"], ["--stages", "'two'"]),
    ("stages-float", [*TINY, "--stages", "2.5"], ["--stages", "'2.5'"]),
    ("stages-too-many-processes", [*TINY, "--stages", "4096", "--link", "gloo"],
     ["4096 stage processes (4096 stages x tp 1) need 4096 cores"]),
    ("stages-more-than-layers-default-link", [*TINY, "--stages", "4096"], ["cannot split 4 layers over 4096 stages"]),
    ("tp-0", [*TINY, "--tp", "0"], ["--tp", "positive integer", "got 0"]),
    ("tp-not-dividing-heads", [*TINY, "--tp", "3", "--stages", "1", "--link", "inprocess"], ["tp=3 does not divide the 4 query heads"]),
    ("tp-too-many-processes", [*TINY, "--tp", "64", "--stages", "64", "--link", "gloo"], ["4096 stage processes (64 stages x tp 64)"]),
    ("tp-too-many-processes-one-stage", [*TINY, "--tp", "64", "--stages", "1", "--link", "gloo"], ["64 stage processes (1 stage x tp 64)"]),
    ("stages-more-than-layers", [*TINY, "--link", "inprocess", "--stages", "5"], ["more stages than layers"]),
    ("prompt-0", ["--model", "tiny", "--prompt-len", "0"], ["--prompt-len", "positive integer"]),
    ("prompt-empty", ["--model", "tiny", "--prompt-len", ""], ["--prompt-len", "comma-separated"]),
    ("prompt-hole", ["--model", "tiny", "--prompt-len", "64,,96"], ["--prompt-len", "'64,,96'"]),
    ("rows-0", ["--model", "tiny", "--rows", "40,0"], ["--rows", "positive integer", "got 0"]),
    ("rows-empty", ["--model", "tiny", "--rows", ""], ["--rows", "comma-separated"]),
    ("rows-text", ["--model", "tiny", "--rows", "40,many"], ["--rows", "'many'"]),
    ("rows-past-context", ["--model", "tiny", "--rows", "40,1024"], ["--rows", "row 1 has 1024 tokens",
                                                                     "max_seq_len 1024"]),
    ("rows-and-prompt-len", ["--model", "tiny", "--rows", "40,60", "--prompt-len", "64"],
     ["--rows 40,60", "drop --prompt-len"]),
    ("rows-and-batch", ["--model", "tiny", "--rows", "40,60", "--batch", "2"], ["--rows 40,60", "drop --batch"]),
    ("rows-and-chunks", ["--model", "tiny", "--rows", "40,60", "--chunks", "20,20"], ["drop --chunks"]),
    ("token-budget-without-rows", [*TINY, "--token-budget", "256"], ["--token-budget 256", "goes with --rows"]),
    ("token-budget-0", ["--model", "tiny", "--rows", "40,60", "--token-budget", "0"],
     ["--token-budget", "positive integer"]),
    ("token-budget-twice", ["--model", "tiny", "--rows", "40,60", "--token-budget", "none,None"],
     ["--token-budget", "listed twice"]),
    ("token-budget-text", ["--model", "tiny", "--rows", "40,60", "--token-budget", "lots"],
     ["--token-budget", "'lots'"]),
    ("rows-and-batch-1", ["--model", "tiny", "--rows", "40,60", "--batch", "1"], ["drop --batch"]),
    ("granularity-without-balanced", [*TINY, "--granularity", "64"],
     ["--granularity 64", "goes with --chunk-plan balanced"]),
    ("page-size-without-rows", [*TINY, "--page-size", "32"], ["--page-size 32", "goes with --rows"]),
    ("page-size-0", ["--model", "tiny", "--rows", "40,60", "--page-size", "0"], ["--page-size", "positive integer"]),
    ("page-size-past-context", ["--model", "tiny", "--rows", "40,60", "--page-size", "1000000"],
     ["--page-size 1000000", "max_seq_len 1024", "1 to 1024"]),
    ("rows-and-balanced", ["--model", "tiny", "--rows", "40,60", "--chunk-plan", "balanced"],
     ["drop --chunk-plan balanced"]),
    ("prompt-twice", ["--model", "tiny", "--prompt-len", "64,64"], ["--prompt-len", "listed twice"]),
    ("prompt-past-context", ["--model", "tiny", "--prompt-len", "5000"], ["5000", "max_seq_len 1024",
                                                                          "--prompt-len 1023 or less"]),
    ("threads-oversubscribed", [*TINY, "--threads", "64"], ["--threads 64", "128 torch threads on", "or less"]),
    ("chunk-size-0", [*TINY, "--chunk-size", "0"], ["--chunk-size", "positive integer"]),
    ("chunk-size-negative", [*TINY, "--chunk-size", "-4"], ["--chunk-size", "positive integer"]),
    ("chunk-size-nan", [*TINY, "--chunk-size", "nan"], ["--chunk-size", "'nan'"]),
    ("chunks-zero", [*TINY, "--chunks", "64,0"], ["--chunks", "positive integer"]),
    ("chunks-wrong-sum", [*TINY, "--chunks", "10,10"], ["sum to 20", "64 tokens"]),
    ("chunks-as-a-count", [*TINY, "--chunks", "3"], ["sum to 3", "64 tokens", "3 chunks of this prompt would be 22,21,21",
                                                    "chunks of 3 tokens are a chunk size"]),
    ("chunks-as-a-count-many", [*TINY, "--chunks", "10"], ["10 chunks of this prompt would be 6-7 tokens each;"]),
    ("chunks-and-size", [*TINY, "--chunks", "32,32", "--chunk-size", "16"], ["--chunk-size or --chunks"]),
    ("chunks-sweep", ["--model", "tiny", "--prompt-len", "32,64", "--chunks", "32"], ["--chunks fits one prompt"]),
    ("granularity-0", [*TINY, "--granularity", "0"], ["--granularity", "positive integer"]),
    ("balanced-with-size", [*TINY, "--chunk-plan", "balanced", "--chunk-size", "16"], ["chooses the chunks"]),
    ("balanced-coarse", [*TINY, "--chunk-plan", "balanced", "--granularity", "65"], ["65", "larger than the prompt"]),
    ("simulate-short-prompt", ["--model", "tiny", "--prompt-len", "7", "--simulate"],
     ["--simulate", "at least 8 tokens, got 7"]),
    ("simulate-short-sweep", ["--model", "tiny", "--prompt-len", "64,5", "--simulate"], ["at least 8 tokens, got 5"]),
    ("balanced-short-prompt", ["--model", "tiny", "--prompt-len", "6", "--chunk-plan", "balanced", "--granularity",
                               "1"], ["--chunk-plan balanced", "at least 8 tokens, got 6"]),
    ("simulate-short-rows", ["--model", "tiny", "--rows", "3,5", "--simulate"], ["a longest row of at least 8 tokens"]),
    ("chunk-plan-unknown", [*TINY, "--chunk-plan", "random"], ["--chunk-plan", "'random'"]),
    ("batch-0", [*TINY, "--batch", "0"], ["--batch", "positive integer"]),
    ("dtype-unknown", [*TINY, "--dtype", "float64"], ["--dtype", "'float64'"]),
    ("link-unknown", [*TINY, "--link", "pigeon"], ["--link", "'pigeon'"]),
    ("link-nccl-without-gpu", [*TINY, "--link", "nccl"], ["nccl", "GPU"]),
    ("bandwidth-0", [*TINY, "--bandwidth-gbps", "0"], ["--bandwidth-gbps", "finite number > 0", "0"]),
    ("bandwidth-negative", [*TINY, "--bandwidth-gbps", "-3"], ["--bandwidth-gbps", "-3"]),
    ("bandwidth-nan", [*TINY, "--bandwidth-gbps", "nan"], ["--bandwidth-gbps", "nan"]),
    ("bandwidth-inf", [*TINY, "--bandwidth-gbps", "inf"], ["--bandwidth-gbps", "inf"]),
    ("bandwidth-text", [*TINY, "--bandwidth-gbps", "fast"], ["--bandwidth-gbps", "'fast'"]),
    ("latency-negative", [*TINY, "--latency-us", "-1"], ["--latency-us", "-1"]),
    ("latency-inf", [*TINY, "--latency-us", "inf"], ["--latency-us", "inf"]),
    ("latency-nan", [*TINY, "--latency-us", "nan"], ["--latency-us", "nan"]),
    ("ops-unknown", [*TINY, "--ops", "cuda"], ["--ops", "'cuda'"]),
    ("sm-partitions-without-gpu", [*TINY, "--sm-partitions"], ["--sm-partitions", "no CUDA GPU"]),
    ("cuda-graphs-without-gpu", [*TINY, "--cuda-graphs"], ["--cuda-graphs", "no CUDA GPU"]),
    ("triton-bf16-interpreter", [*TINY, "--ops", "triton", "--dtype", "bfloat16"], ["bfloat16", "interpreter"]),
    ("modes-empty", [*TINY, "--modes", ","], ["--modes", "','"]),
    ("modes-unknown", [*TINY, "--modes", "warp"], ["--modes", "'warp'", "unchunked"]),
    ("modes-twice", [*TINY, "--modes", "naive,naive"], ["--modes", "listed twice"]),
    ("repeats-0", [*TINY, "--repeats", "0"], ["--repeats", "positive integer"]),
    ("warmup-negative", [*TINY, "--warmup", "-1"], ["--warmup", "integer >= 0", "-1"]),
    ("threads-0", [*TINY, "--threads", "0"], ["--threads", "positive integer"]),
    ("out-empty", [*TINY, "--out", ""], ["--out", "empty path"]),
    ("out-is-a-file", [*TINY, "--out", "{file:other.json}"], ["--out", "not a directory"]),
    ("out-unwritable", [*TINY, "--out", "/proc/forbidden/o"], ["cannot write to output directory"]),
    ("unknown-option", [*TINY, "--no-such-option"], ["unknown option --no-such-option (see --help)"]),
    ("model-unknown", ["--model", "gpt5", "--prompt-len", "64"], ["unknown preset 'gpt5'", "tiny"]),
    ("model-missing-dir", ["--model", "./no/such/model", "--prompt-len", "64"], ["./no/such/model", "not exist"]),
    ("model-a-file", ["--model", "{ckpt:a-file}", "--prompt-len", "64"], ["is a file", "config.json"]),
    # checkpoints: validated in this process before any stage starts
    ("ckpt-no-config", ["--model", "{ckpt:no-config}", "--prompt-len", "64"], ["no config.json"]),
    ("ckpt-no-heads", ["--model", "{ckpt:no-heads}", "--prompt-len", "64"], ["lacks 'num_attention_heads'"]),
    ("ckpt-heads-text", ["--model", "{ckpt:heads-text}", "--prompt-len", "64"],
     ["num_attention_heads='four'", "positive integer"]),
    ("ckpt-bad-json", ["--model", "{ckpt:bad-json}", "--prompt-len", "64"], ["not valid JSON"]),
    ("ckpt-gpt2", ["--model", "{ckpt:gpt2}", "--prompt-len", "64"], ["unsupported architecture 'gpt2'", "llama"]),
    ("ckpt-dynamic", ["--model", "{ckpt:dynamic}", "--prompt-len", "64"], ["RoPE type 'dynamic'", "llama3", "yarn"]),
    ("ckpt-no-weights", ["--model", "{ckpt:no-weights}", "--prompt-len", "64"], ["no model.safetensors"]),
    ("ckpt-pickle", ["--model", "{ckpt:pickle}", "--prompt-len", "64"],
     ["no model.safetensors", "found pytorch_model.bin", "save_pretrained"]),
    ("ckpt-truncated", ["--model", "{ckpt:truncated}", "--prompt-len", "64"], ["model.safetensors", "truncated"]),
    ("ckpt-o-bias", ["--model", "{ckpt:o-bias}", "--prompt-len", "64"], ["o_proj.bias", "does not use"]),
    ("ckpt-int8", ["--model", "{ckpt:int8}", "--prompt-len", "64"], ["up_proj.weight", "I8", "F32"]),
    ("ckpt-shape", ["--model", "{ckpt:shape}", "--prompt-len", "64"], ["model.norm.weight", "(65,)", "(64,)"]),
    ("ckpt-missing", ["--model", "{ckpt:missing}", "--prompt-len", "64"], ["lacks tensor(s)", "down_proj"]),
    ("ckpt-missing-shard", ["--model", "{ckpt:missing-shard}", "--prompt-len", "64"], ["part2.safetensors"]),
    # compare
    ("compare-missing-file", ["compare", "{file:nothing.json}", "{file:other.json}"], ["nothing.json"]),
    ("compare-not-json", ["compare", "{file:not-json.json}", "{file:not-json.json}"], ["not-json.json", "JSON"]),
    ("compare-not-results", ["compare", "{file:other.json}", "{file:other.json}"], ["other.json", "not a results"]),
    ("compare-a-list", ["compare", "{file:list.json}", "{file:list.json}"], ["list.json", "not a results"]),
    ("compare-kernels-with-results", ["compare", "{file:kernels.json}", "{file:no-points.json}"],
     ["kernels.json is a kernel benchmark file", "no-points.json is not"]),
    ("compare-no-points", ["compare", "{file:no-points.json}", "{file:no-points.json}"], ["no points"]),
    ("compare-threshold-nan", ["compare", "{file:other.json}", "{file:other.json}", "--threshold", "nan"],
     ["--threshold", "nan"]),
    ("compare-threshold-negative", ["compare", "{file:other.json}", "{file:other.json}", "--threshold", "-0.5"],
     ["--threshold", "-0.5", ">= 0"]),
    ("compare-threshold-inf", ["compare", "{file:other.json}", "{file:other.json}", "--threshold", "inf"],
     ["--threshold", "inf"]),
    ("compare-one-file", ["compare", "{file:other.json}"], ["required", "new"]),
    # simulate
    ("sim-device", ["simulate", "--device", "tpu"], ["--device", "'tpu'", "h100"]),
    ("sim-link", ["simulate", "--links", "pcie9"], ["--links", "'pcie9'", "nvlink"]),
    ("sim-model", ["simulate", "--models", "gpt5"], ["--models", "'gpt5'", "llama3-8b", "Hugging Face directory"]),
    ("sim-model-a-file", ["simulate", "--models", "{ckpt:a-file}"], ["--models", "is a file", "config.json"]),
    ("sim-model-no-config", ["simulate", "--models", "llama3-8b,{ckpt:no-config}"], ["--models", "no config.json"]),
    ("sim-model-dynamic", ["simulate", "--models", "{ckpt:dynamic}"], ["--models", "RoPE type 'dynamic'"]),
    ("sim-model-dir-past-context",  # the checkpoint's config is read for its shape (weights or not)
     ["simulate", "--models", "{ckpt:no-weights}", "--stages", "2", "--prompt-lens", "4096"], ["4096", "context of"]),
    ("sim-prompt-0", ["simulate", "--prompt-lens", "0"], ["--prompt-lens", "positive integer"]),
    ("sim-prompt-fraction-of-k", ["simulate", "--prompt-lens", "4k,4.5k"],
     ["--prompt-lens", "'4.5k'", "k = 1024"]),
    ("sim-past-context-in-k", ["simulate", "--models", "llama3-8b", "--prompt-lens", "256k"],
     ["262144", "context of 131072"]),
    ("sim-past-context", ["simulate", "--models", "llama3-8b", "--prompt-lens", "200000"],
     ["200000", "context of 131072"]),
    ("sim-stages", ["simulate", "--models", "llama3-8b", "--stages", "64"], ["32 layers", "64 stages"]),
    ("sim-stages-empty", ["simulate", "--stages", ""], ["--stages", "comma-separated"]),
    ("sim-chunk-size-balanced", ["simulate", "--chunk-size", "512"], ["--chunk-size 512", "--chunk-plan uniform"]),
    ("sim-granularity-uniform", ["simulate", "--chunk-plan", "uniform", "--granularity", "256"],
     ["--granularity 256", "uniform plan", "drop --granularity"]),
    ("sim-granularity", ["simulate", "--granularity", "9000", "--prompt-lens", "4096"], ["9000", "larger than the prompt",
                                                                                          "(4096 tokens)"]),
    # too fine for the planner at the longest prompt: refused before the first point (it was refused at 8k, after 4k)
    ("sim-granularity-fine", ["simulate", "--chunk-plan", "balanced", "--granularity", "7"],
     ["131072-token prompt into 18725 pieces", "--granularity >= 128"]),
    ("sim-tp-granularity-fine", ["simulate", "--gpus", "8", "--granularity", "7"],
     ["131072-token prompt into 18725 pieces", "--granularity >= 128"]),
    ("sim-batch-0", ["simulate", "--batch", "0"], ["--batch", "positive integer"]),
    ("sim-chunk-size", ["simulate", "--chunk-size", "-1"], ["--chunk-size", "positive integer"]),
    ("sim-out-empty", ["simulate", "--out", ""], ["--out", "empty path"]),
    # kernels
    ("kernels-shape-three", ["kernels", "--sweep", "--shape", "1,2,3"], ["--shape", "PREFIX,CHUNK", "'1,2,3'"]),
    ("kernels-shape-negative", ["kernels", "--sweep", "--shape=-1,5"], ["--shape", "PREFIX >= 0"]),
    # a value that starts with a minus is still the option's value (argparse alone says "expected one argument")
    ("kernels-shape-negative-spaced", ["kernels", "--sweep", "--shape", "-1,5"], ["--shape", "PREFIX >= 0", "-1,5"]),
    ("prompt-negative-list", ["--model", "tiny", "--prompt-len", "-4096,8192"], ["--prompt-len", "got -4096"]),
    ("latency-minus-inf", [*TINY, "--latency-us", "-inf"], ["--latency-us", "got -inf"]),
    ("bandwidth-minus-point", [*TINY, "--bandwidth-gbps", "-.5"], ["--bandwidth-gbps", "got -.5"]),
    ("kernels-shape-alone", ["kernels", "--shape", "16,16"], ["--shape goes with --sweep"]),
    ("kernels-sweep-quick", ["kernels", "--sweep", "--quick"], ["--quick", "--sweep", "drop --quick"]),
    # gpu-suite
    ("suite-parts", ["gpu-suite", "--out", "{out}", "--parts", "tests,benchmarks"], ["--parts", "'benchmarks'"]),
    ("suite-layers", ["gpu-suite", "--out", "{out}", "--layers", "0"], ["--layers", "positive integer"]),
    ("suite-no-out", ["gpu-suite"], ["--out", "required"]),
    ("suite-corrupt", ["gpu-suite", "--summary-only", "--out", "{file:suite-corrupt}"], ["kernels.json", "readable"]),
    ("suite-empty", ["gpu-suite", "--summary-only", "--out", "{file:suite-empty}"], ["nothing to summarise"]),
    ("suite-no-environment", ["gpu-suite", "--summary-only", "--out", "{file:suite-noenv}"],
     ["tests.json", "environment"]),
    ("suite-summary-and-quick", ["gpu-suite", "--summary-only", "--quick", "--layers", "4", "--out", "{out}"],
     ["--summary-only measures nothing", "drop --layers, --quick"]),
    ("suite-summary-no-dir", ["gpu-suite", "--summary-only", "--out", "{out}"], ["--summary-only", "not a directory"]),
    # machine-check
    ("check-inf", ["machine-check", "--seconds", "inf"], ["--seconds", "inf"]),
    ("check-nan", ["machine-check", "--seconds", "nan"], ["--seconds", "nan"]),
    ("check-0", ["machine-check", "--seconds", "0"], ["--seconds", "> 0"]),
    ("batch-past-memory", ["--model", "tiny", "--prompt-len", "64", "--batch", "100000000"],
     ["batch 100000000 x prompt 64 needs at least", "GB of cpu memory here"]),
    ("link-send-past-wait", [*TINY, "--bandwidth-gbps", "1e-7"],
     ["emulated link (1e-07 GB/s", "64-token send", "half or more of the 60 s a stage waits"]),
    ("link-hours", ["--model", "tiny", "--prompt-len", "500", "--chunk-size", "1", "--latency-us", "10000000"],
     ["emulated link", "would take 1.4 h", "500-token prompt"]),
    ("check-negative", ["machine-check", "--seconds", "-2"], ["--seconds", "-2"]),
    ("check-day", ["machine-check", "--seconds", "86400"], ["--seconds", "<= 3600"]),
    # options in full: an abbreviation is refused, naming what it may stand for (argparse would run `--tp 2` as
    # simulate's `--tp-link 2`)
    ("abbreviation", ["--model", "tiny", "--prompt", "64"], ["unknown option --prompt; did you mean --prompt-len?"]),
    ("abbreviation-of-several", ["--model", "tiny", "--chunk", "8"],
     ["unknown option --chunk; did you mean --chunk-size, --chunks or --chunk-plan?"]),
    ("other-subcommands-option", ["simulate", "--tp", "2"],
     ["simulate: unknown option --tp; tensor parallelism here: --gpus N projects every T x S = N (see --help)"]),
    ("other-subcommands-option-misspelt-too", ["simulate", "--tp", "2", "--modle", "x"],
     ["simulate: unknown options --tp, --modle; did you mean --models?; tensor parallelism here: --gpus N"]),
    ("misspelt", ["--model", "tiny", "--promtp-len=64"], ["unknown option --promtp-len; did you mean --prompt-len?"]),
    ("unknown-options", ["--model", "tiny", "--foo", "--bar=1"], ["unknown options --foo, --bar (see --help)"]),
    ("simulates-option", ["--model", "tiny", "--gpus", "8"],
     ["unknown option --gpus; projections to GPUs that are not here: python -m bench simulate --gpus N"]),
    ("simulates-option-device", ["--model", "tiny", "--device", "cpu"],
     ["unknown option --device; the demo runs on CUDA when present, on the CPU without it or with --link gloo"]),
    ("subcommand-misspelt", ["simualte", "--stages", "2"], ["unknown subcommand 'simualte'; did you mean simulate?",
                                                            "subcommands: compare, simulate, kernels"]),
    ("subcommand-underscore", ["gpu_suite"], ["unknown subcommand 'gpu_suite'; did you mean gpu-suite?"]),
    ("subcommand-unknown", ["train"], ["unknown subcommand 'train' (subcommands: compare, simulate"]),
    ("abbreviated-subcommand-option", ["compare", "{file:other.json}", "{file:other.json}", "--thresh", "0.1"],
     ["unknown option --thresh; did you mean --threshold?"]),
]


def _expand(argv, checkpoints, files, out):
    def one(a):
        a = re.sub(r"\{ckpt:([\w-]+)\}", lambda m: str(checkpoints[m.group(1)]), a)  # anywhere: lists too
        if a.startswith("{file:"):
            return str(files / a[6:-1])
        return str(out) if a == "{out}" else a
    argv = [one(a) for a in argv]
    if argv[:1] not in (["compare"], ["machine-check"], ["kernels"], ["gpu-suite"]) and "--out" not in argv:
        argv += ["--out", str(out)]
    return argv


@pytest.mark.parametrize("argv,needles", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_refuses_bad_input_in_one_line(argv, needles, checkpoints, files, tmp_path, capsys, monkeypatch):
    from bench.cli import main
    if torch.cuda.is_available() and ("--sm-partitions" in argv or "--cuda-graphs" in argv or "nccl" in argv):
        pytest.skip("a GPU is here: the option is valid")
    monkeypatch.chdir(tmp_path)  # nothing may appear here either
    out = tmp_path / "o"
    argv = _expand(argv, checkpoints, files, out)
    t0 = time.time()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    took = time.time() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"exit {code} for {argv}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert list(tmp_path.iterdir()) == []  # no output directory, nothing in the working directory either
    assert took < 30, f"took {took:.0f} s to refuse"


def test_a_sweep_refuses_a_point_past_memory_before_its_first_point_runs(tmp_path, capsys, monkeypatch):
    """Every point of a sweep is checked against the machine's memory before any runs: the first point here fits,
    the second (a 16x longer prompt) does not, and nothing may run or be written before the refusal."""
    import pipeline.launch
    from bench.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.launch, "memory_available", lambda device: 2 * 10**9)
    code = main(["--model", "tiny", "--prompt-len", "64,1000", "--batch", "1000", "--link", "inprocess",
                 "--out", str(tmp_path / "o")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "batch 1000 x prompt 1000 needs at least" in lines[0] and "2.0 GB of cpu memory" in lines[0]
    assert list(tmp_path.iterdir()) == []
    # the first point alone fits the same memory and runs
    from bench.harness import check_point_fits
    from pipeline import PipelineSpec
    check_point_fits(PipelineSpec(source="tiny", stages=2, link="inprocess"), 64, 1000, [64], ["naive"])


def test_cli_refuses_triton_on_cpu_without_the_interpreter(tmp_path, capsys, monkeypatch):
    from bench.cli import main
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main([*TINY, "--ops", "triton", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "TRITON_INTERPRET=1" in err and "\n" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--model", "tiny", "--prompt-len", "64", "--warmup", "-1"], "--warmup"),
    (["compare", "{file:other.json}", "{file:other.json}"], "not a results file"),
    (["--model", "{ckpt:truncated}", "--prompt-len", "64"], "truncated"),
], ids=["usage", "compare", "checkpoint"])
def test_the_real_entry_point_prints_one_line_and_no_traceback(argv, needle, checkpoints, files, tmp_path):
    """The same through `python -m bench` in a process of its own: what a user's terminal shows."""
    argv = _expand(argv, checkpoints, files, tmp_path / "o")
    res = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_a_reader_that_stops_early_ends_the_run_quietly(tmp_path):
    """`python -m bench simulate | head -1`: the reader closes the pipe after one line; the command stops without a
    message (no "Broken pipe" error, no traceback) and exits 141, as `cat` killed by SIGPIPE would; what it wrote
    before is complete. The same for `python -m kernels.aot --list | head -1`."""
    simulate = ["-m", "bench", "simulate", "--models", "llama3-8b", "--stages", "2", "--links", "nvlink", "--out",
                str(tmp_path / "o")]
    cases = [(simulate, ["simulate.json", "simulate.png"], "1"), (simulate, ["simulate.json", "simulate.png"], ""),
             (["-m", "bench", "machine-check", "--seconds", "0.2"], [], ""),
             (["-m", "kernels.aot", "--list"], [], "1"), (["-m", "kernels.aot", "--list", "--only", "swiglu"], [], "")]
    for argv, wrote, unbuffered in cases:  # buffered, the last write is Python's flush at exit
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "TRITON_INTERPRET")}
        # `true` reads nothing and is gone long before Python has started: every write meets a closed pipe
        res = subprocess.run(f"{shlex.join([sys.executable, *argv])} 2>{tmp_path / 'err'} | true; "
                             "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env=dict(env, PYTHONUNBUFFERED=unbuffered))
        err = (tmp_path / "err").read_text()
        assert res.stdout.strip() == "141", (argv, res.stdout, err)
        assert "Broken pipe" not in err and "Traceback" not in err and "rror" not in err, err
        for name in wrote:
            assert (tmp_path / "o" / name).stat().st_size > 0


# ---- the Python API ----------------------------------------------------------------------------------------------

def _tokens(L=40, B=1, dtype=torch.long, high=256):
    return torch.randint(0, high, (B, L), generator=torch.Generator().manual_seed(0)).to(dtype)


def _prefill(**kw):
    from pipeline import run_prefill
    args = dict(source="tiny", tokens=_tokens(), mode="overlapped", stages=2, chunk_size=10) | kw
    return lambda: run_prefill(**args)


def _loaded_tiny():
    from pipeline import load_model
    return load_model("tiny")


def _attn(**over):
    from kernels import chunk_attention
    t = dict(q=torch.zeros(1, 4, 4, 16), k_new=torch.zeros(1, 4, 2, 16), v_new=torch.zeros(1, 4, 2, 16),
             k_cache=torch.zeros(1, 10, 2, 16), v_cache=torch.zeros(1, 10, 2, 16), start_pos=0) | over
    return lambda: chunk_attention(**t)


def _call(module, name, *args, **kw):
    def f():
        import importlib
        return getattr(importlib.import_module(module), name)(*args, **kw)
    return f


def _plan(**kw):
    from pipeline.costs import ChunkCost
    args = dict(prompt_len=1000, cost=ChunkCost(1e-9, 1e-9, 1e-5, 1e-4), stages=2, granularity=64) | kw
    return _call("pipeline.plan", "plan_chunks", **args)


def _sim(mode="chunked", chunks=(4, 4), costs=None, **kw):
    from pipeline.costs import ChunkCost
    costs = [ChunkCost(0, 0, 1e-3, 0)] * 2 if costs is None else costs
    return _call("pipeline.simulate", "simulate", mode, list(chunks), costs, **kw)


X = torch.zeros(2, 3, 8)
COS, SIN = (torch.zeros(16, 4), torch.zeros(16, 4))

API = [
    # run_prefill: each argument
    ("mode", _prefill(mode="pipelined"), ["'pipelined'", "overlapped"]),
    ("tp-comm-without-tp", _prefill(tp_comm="sequence"), ["tp_comm='sequence'", "tp >= 2", "tp=1"]),
    ("tp-boundary-without-tp", _prefill(tp_boundary="sharded"), ["tp_boundary='sharded'", "tp >= 2", "tp=1"]),
    ("page-size-dense", _prefill(page_size=32), ["page_size=32", "ragged batch", "dense cache"]),
    ("tp-boundary-one-stage", _prefill(tp_boundary="broadcast", tp=2, stages=1),
     ["tp_boundary='broadcast'", "stages >= 2", "stages=1"]),
    ("tokens-list", _prefill(tokens=[[1, 2, 3]]), ["tokens", "list"]),
    ("tokens-int16", _prefill(tokens=_tokens(dtype=torch.int16)), ["torch.long", "torch.int32", "int16"]),
    ("tokens-float", _prefill(tokens=_tokens(dtype=torch.float32)), ["torch.long", "float32"]),
    ("tokens-1d", _prefill(tokens=torch.zeros(40, dtype=torch.long)), ["[B, L]", "(40,)"]),
    ("tokens-empty", _prefill(tokens=torch.zeros(1, 0, dtype=torch.long)), ["empty prompt", "(1, 0)"]),
    ("tokens-no-rows", _prefill(tokens=torch.zeros(0, 5, dtype=torch.long)), ["[B, L]", "(0, 5)"]),
    ("tokens-id-too-big", _prefill(tokens=torch.full((1, 40), 256)), ["[0, 256)", "max 256"]),
    ("tokens-id-negative", _prefill(tokens=torch.full((1, 40), -1)), ["[0, 256)", "min -1"]),
    ("tokens-past-context", _prefill(tokens=_tokens(L=1024)), ["1024 tokens", "max_seq_len 1024"]),
    ("chunk-size-bool", _prefill(chunk_size=True), ["chunk_size", "True"]),
    ("chunk-size-0", _prefill(chunk_size=0), ["chunk_size", "positive integer"]),
    ("chunk-size-float", _prefill(chunk_size=2.5), ["chunk_size", "2.5"]),
    ("chunks-float", _prefill(chunk_size=None, chunks=[20, 20.0]), ["chunk sizes[1]", "20.0"]),
    ("chunks-sum", _prefill(chunk_size=None, chunks=[10, 10]), ["sum to 20", "40 tokens"]),
    ("chunks-and-size", _prefill(chunks=[40]), ["chunk_size or chunks"]),
    ("stages-0", _prefill(stages=0), ["stages", "got 0"]),
    ("stages-too-many", _prefill(stages=5), ["more stages than layers"]),
    ("stages-list-sum", _prefill(stages=[1, 2]), ["sum to 3", "4"]),
    ("stages-bool", _prefill(stages=True), ["stages", "True"]),
    ("link", _prefill(link="carrier-pigeon"), ["'carrier-pigeon'", "gloo"]),
    ("ops", _prefill(ops="cuda"), ["'cuda'", "torch"]),
    ("dtype", _prefill(dtype="float64"), ["'float64'", "bfloat16"]),
    ("device", _prefill(device="gpu"), ["'gpu'", "cpu"]),
    ("device-cuda-absent", _prefill(device="cuda"), ["'cuda'", "CUDA is not available"]),
    ("bandwidth-nan", _prefill(bandwidth_gbps=float("nan")), ["bandwidth_gbps", "nan"]),
    ("bandwidth-0", _prefill(bandwidth_gbps=0.0), ["bandwidth_gbps", "> 0"]),
    ("bandwidth-inf", _prefill(bandwidth_gbps=math.inf), ["bandwidth_gbps", "inf"]),
    ("latency-negative", _prefill(latency_s=-1.0), ["latency_s", ">= 0"]),
    ("latency-nan", _prefill(latency_s=float("nan")), ["latency_s", "nan"]),
    ("decode-text", _prefill(decode="yes"), ["decode", "'yes'"]),
    ("unknown-keyword", _prefill(colour="blue"), ["unexpected keyword", "colour"]),
    ("source-number", _prefill(source=42), ["model source", "42"]),
    ("source-loaded-model", lambda: _prefill(source=_loaded_tiny())(), ["model source", "a Transformer module",
                                                                        "what it was loaded from"]),
    ("chunk-size-tensor", _prefill(chunk_size=torch.arange(50)), ["chunk_size", "a Tensor of shape (50,)"]),
    ("stages-array", _prefill(stages=np.arange(100)), ["stages", "a ndarray of shape (100,)"]),
    ("chunks-long-list", _prefill(chunk_size=None, chunks=list(range(1, 60)) + [0.5]),
     ["chunk sizes[59]", "0.5 (float)"]),
    ("seed-long-list", _prefill(seed=list(range(200))), ["seed", "(a list of 200)"]),
    ("source-empty", _prefill(source=""), ["model source", "''"]),
    ("source-unknown", _prefill(source="gpt5"), ["unknown preset 'gpt5'"]),
    ("source-missing-dir", _prefill(source="./no/such"), ["./no/such", "not exist"]),
    ("seed", _prefill(seed=1.5), ["seed", "1.5"]),
    ("threads", _prefill(threads=0), ["threads", "positive integer"]),
    ("timeout", _prefill(timeout_s=0), ["timeout_s", "> 0"]),
    # load_model
    ("load-dtype", _call("pipeline", "load_model", "tiny", dtype="half"), ["'half'", "float16"]),
    ("load-device", _call("pipeline", "load_model", "tiny", device="tpu"), ["'tpu'", "cpu"]),
    ("load-layers-list", _call("pipeline", "load_model", "tiny", layers=[0, 1]), ["layers", "range"]),
    ("load-layers-outside", _call("pipeline", "load_model", "tiny", layers=range(2, 9)), ["range(2, 9)", "[0, 4)"]),
    ("load-ops", _call("pipeline", "load_model", "tiny", ops="numpy"), ["'numpy'", "triton"]),
    # chunk_attention
    ("attn-start-float", _attn(start_pos=5.7), ["start_pos", "5.7"]),
    ("attn-start-bool", _attn(start_pos=True), ["start_pos", "True"]),
    ("attn-start-negative", _attn(start_pos=-1), ["start_pos", ">= 0", "-1"]),
    ("attn-start-past-cache", _attn(start_pos=7), ["start_pos + C = 11", "max_len 10"]),
    ("attn-start-row", _attn(start_pos=torch.tensor([-4])), ["start_pos[0] = -4", "[0, 6]"]),
    ("attn-q-list", _attn(q=[[0.0]]), ["q", "torch.Tensor", "list"]),
    ("attn-head-dim", _attn(q=torch.zeros(1, 4, 4, 264), k_new=torch.zeros(1, 4, 2, 264),
                            v_new=torch.zeros(1, 4, 2, 264), k_cache=torch.zeros(1, 10, 2, 264),
                            v_cache=torch.zeros(1, 10, 2, 264)), ["head dim 264", "1 to 256"]),
    ("attn-zero-heads", _attn(k_new=torch.zeros(1, 4, 0, 16), v_new=torch.zeros(1, 4, 0, 16)), ["k_new", "(1, 4, 0, 16)"]),
    ("attn-scale-nan", _attn(sm_scale=float("nan")), ["sm_scale", "nan"]),
    ("attn-scale-0", _attn(sm_scale=0.0), ["sm_scale", "positive"]),
    ("attn-bf16-cpu", _attn(**{n: torch.zeros(1, L, H, 16, dtype=torch.bfloat16) for n, L, H in
                               (("q", 4, 4), ("k_new", 4, 2), ("v_new", 4, 2), ("k_cache", 10, 2), ("v_cache", 10, 2))}),
     ["bfloat16", "interpreter"]),
    ("attn-config", _attn(config=dict(BLOCK_M=48, BLOCK_N=64, num_warps=4, num_stages=2)), ["BLOCK_M", "power of two"]),
    # the other ops
    ("rope-start-float", _call("kernels", "rope", torch.zeros(1, 3, 2, 8), COS, SIN, 2.5), ["start_pos", "2.5"]),
    ("rope-start-negative", _call("kernels", "rope", torch.zeros(1, 3, 2, 8), COS, SIN, -1), ["positions [-1, 2)"]),
    ("rope-3d", _call("kernels", "rope", torch.zeros(3, 2, 8), COS, SIN, 0), ["[B, C, H, D]", "(3, 2, 8)"]),
    ("rope-odd-head-dim", _call("kernels", "rope", torch.zeros(1, 3, 2, 7), torch.zeros(16, 3), torch.zeros(16, 3),
                                0), ["head dim must be even", "7"]),
    ("norm-eps-nan", _call("kernels", "add_rms_norm", X, None, torch.ones(8), float("nan")), ["eps", "nan"]),
    ("norm-eps-negative", _call("kernels", "add_rms_norm", X, None, torch.ones(8), -1.0), ["eps", "-1"]),
    ("norm-x-list", _call("kernels", "add_rms_norm", [1.0], None, torch.ones(8), 1e-5), ["x", "torch.Tensor"]),
    ("norm-weight", _call("kernels", "add_rms_norm", X, None, torch.ones(7), 1e-5), ["weight must be [8]", "(7,)"]),
    ("swiglu-shapes", _call("kernels", "swiglu", X, torch.zeros(2, 3, 9)), ["gate", "up", "must match"]),
    ("swiglu-int", _call("kernels", "swiglu", X.long(), X.long()), ["gate and up", "int64"]),
    ("swiglu-gate-none", _call("kernels", "swiglu", None, X), ["gate", "NoneType"]),
    # planner
    ("plan-length-0", _plan(prompt_len=0), ["prompt_len", "positive integer"]),
    ("plan-granularity-bool", _plan(granularity=True), ["granularity", "True"]),
    ("plan-stages-float", _plan(stages=1.5), ["stages", "1.5"]),
    ("plan-num-chunks", _plan(num_chunks=50), ["num_chunks", "1..16", "50"]),
    ("plan-max-chunk", _plan(max_chunk=10), ["max_chunk 10", "granularity 64"]),
    ("plan-start-negative", _plan(start_pos=-1), ["start_pos", "-1"]),
    ("plan-cost", _plan(cost="fast"), ["cost", "callable"]),
    ("plan-cost-nan", _plan(cost=lambda x, p: x * np.nan), ["cost returned nan"]),
    ("plan-bytes", _plan(bytes_per_token=-1), ["bytes_per_token", "-1"]),
    # simulator
    ("sim-mode", _sim(mode="eager"), ["'eager'", "overlapped"]),
    ("sim-chunk-0", _sim(chunks=(4, 0)), ["chunk sizes[1]", "0"]),
    ("sim-chunk-float", _sim(chunks=(4.5,)), ["chunk sizes[0]", "4.5"]),
    ("sim-no-costs", _sim(costs=[]), ["one cost per stage"]),
    ("sim-cost-text", _sim(costs=["fast"]), ["costs[0]", "callable"]),
    ("sim-cost-negative", _sim(costs=[lambda x, p: -1.0]), ["costs[0] returned -1.0"]),
    ("sim-link", _sim(link=100.0), ["link", "LinkModel"]),
    ("sim-bytes", _sim(bytes_per_token=-4), ["bytes_per_token", "-4"]),
    ("sim-fit-short-prompt", _call("bench.harness", "run_point", PipelineSpec(source="tiny", stages=1), 5, 1, [5], 1,
                                   0, simulate=True), ["simulate", "at least 8 tokens, got 5"]),
    ("sim-fit-short-rows", _call("bench.harness", "run_point", PipelineSpec(source="tiny", stages=1), 0, 1, [], 1, 0,
                                 simulate=True, rows=[2, 3]), ["a longest row of at least 8 tokens, got 3"]),
    ("calibrate-short", _call("bench.calibration", "calibrate", PipelineSpec(source="tiny", stages=1), 4, 1),
     ["calibrate", "at least 8 tokens, got 4"]),
    # links, configs, compare
    ("link-bandwidth-nan", _call("pipeline", "LinkModel", float("nan")), ["bandwidth", "nan"]),
    ("link-latency-inf", _call("pipeline", "LinkModel", None, math.inf), ["latency", "inf"]),
    ("config-hidden-0", _call("pipeline", "ModelConfig", 256, 0, 2, 2, 2, 16, 32), ["hidden_size", "0"]),
    ("config-eps-nan", _call("pipeline", "ModelConfig", 256, 64, 2, 4, 2, 16, 32, rms_norm_eps=float("nan")),
     ["rms_norm_eps", "nan"]),
    ("config-heads", _call("pipeline", "ModelConfig", 256, 64, 2, 4, 3, 16, 32), ["num_heads (4)", "num_kv_heads (3)"]),
    ("compare-threshold", _call("bench.compare", "compare", "a.json", "b.json", float("nan")), ["threshold", "nan"]),
    ("compare-threshold-negative", _call("bench.compare", "compare", "a.json", "b.json", -1.0), ["threshold", "-1"]),
]


@pytest.mark.parametrize("call,needles", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api_refuses_bad_input_in_one_line(call, needles):
    t0 = time.time()
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert time.time() - t0 < 30


def test_there_are_at_least_80_distinct_cases():
    assert len({c[0] for c in CLI}) == len(CLI) and len({c[0] for c in API}) == len(API)
    assert len(CLI) + len(API) >= 80


def test_a_checkpoint_loads_after_the_same_checks(checkpoints):
    """The good checkpoint passes every check the broken ones fail (the table above is not refusing everything)."""
    from pipeline import PipelineSpec, load_model
    PipelineSpec(source=str(checkpoints["good"]), stages=2, link="gloo").validate()
    assert load_model(checkpoints["good"]).cfg.num_layers == 2


def test_results_json_is_strict(tmp_path):
    """No NaN or Infinity in what the harness writes: null, with the reason listed under "nulls"."""
    from bench.report import dump_json
    text = dump_json({"a": float("nan"), "b": [1.0, math.inf], "c": {"d": 2}})
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert doc["a"] is None and doc["b"] == [1.0, None] and doc["c"] == {"d": 2}
    assert set(doc["nulls"]) == {"$.a", "$.b[1]"}


@pytest.mark.parametrize("extra,needle", [
    (["--rows", "20,30"], "drop --rows"),
    (["--tp", "2"], "drop --tp"),
    (["--link", "gloo"], "drop --link gloo"),
    (["--warmup", "0"], "give --warmup 1 or more"),
])
def test_cuda_graphs_refuse_what_they_cannot_replay_even_with_a_gpu(extra, needle, monkeypatch, tmp_path, capsys):
    """As on a GPU machine (CUDA reported present; every refusal comes before any GPU work): --cuda-graphs with a
    ragged batch, TP, a process link or no warm-up run is refused in one line, nothing written."""
    from bench.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    code = main([*TINY, "--cuda-graphs", *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--cuda-graphs" in err and needle in err, err
    assert not (tmp_path / "o").exists()


def test_an_error_shows_any_value_on_one_short_line():
    from kernels.shapes import shown
    path = "/data/" + "x" * 200
    assert shown(path) == repr(path)  # a path whole, however long
    assert shown(5.5, typed=True) == "5.5 (float)" and shown(torch.tensor(3)) == "tensor(3)"
    assert shown(torch.zeros(300, 2)) == "a Tensor of shape (300, 2), torch.float32"
    assert shown(torch.nn.Linear(4, 4)) == "Linear(in_features=4, out_features=4, bias=True)"
    assert shown(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())) == "a Sequential module"
    long = shown(dict.fromkeys(range(100)))
    assert "\n" not in long and long.endswith("... (a dict of 100)") and len(long) < 120
