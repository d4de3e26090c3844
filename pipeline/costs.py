"""What one stage's chunk costs, in seconds: fitted from measured per-chunk times (`ChunkCost`, `fit_chunk_cost`),
or derived from a roofline of FLOPs and bytes against a device's peak rates (`RooflineCost`, `DEVICES`); and what a
link costs per send (`LinkModel`, `fit_link`, `LINK_PRESETS`). The planner and the simulator consume both kinds
through one call: `cost(x, p)` -> seconds for a chunk of `x` tokens after a prefix of `p` tokens (numpy arrays
broadcast)."""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import statistics
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .link import LinkModel
from .schedule import chunk_starts

# ---- fitted: t(x, p) = a·x² + b·x·p + c·x + d --------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkCost:
    """Seconds for a chunk of x tokens after a prefix of p tokens: a·x² + b·x·p + c·x + d.
    a·x² and b·x·p are attention (quadratic in the chunk, linear in the prefix), c·x the per-token work (GEMMs,
    norms), d the per-chunk overhead (launches, Python, synchronisation).
    A stage whose layers have a sliding window (`window`, in the share `windowed` of its layers:
    `ModelConfig.window_layers`) reads in those layers only the prefix keys its chunk's first query sees,
    min(p, window - 1) (the attention backends skip the keys below): p in b·x·p is then `prefix_read(p)`, the
    layers' average."""
    a: float
    b: float
    c: float
    d: float
    window: int | None = None
    windowed: float = 0.0

    def __post_init__(self):
        w, f = self.window, self.windowed
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ValueError(f"ChunkCost.window must be a positive integer or None, got {w!r}")
        if not 0.0 <= f <= 1.0 or (f and w is None):
            raise ValueError(f"ChunkCost.windowed is the share of the stage's layers with the window, in [0, 1] "
                             f"(0 without a window), got {f!r} with window {w!r}")

    def prefix_read(self, p):
        """The prefix keys a query of a chunk after p positions reads, on average over the stage's layers."""
        p = np.asarray(p, dtype=np.float64)
        if not self.windowed:
            return p
        return (1.0 - self.windowed) * p + self.windowed * np.minimum(p, self.window - 1)

    def __call__(self, x, p):
        x = np.asarray(x, dtype=np.float64)
        return self.a * x * x + self.b * x * self.prefix_read(p) + self.c * x + self.d

    def fields(self) -> dict:
        """The coefficients (and the window, where the stage has one) for results files: `ChunkCost(**fields)`."""
        out = dataclasses.asdict(self)
        return out if self.windowed else {k: out[k] for k in "abcd"}


def cost_form(costs) -> str:
    """The formula of fitted `ChunkCost`s, in words, for results files."""
    if not any(c.windowed for c in costs):
        return "a*x^2 + b*x*p + c*x + d seconds"
    return ("a*x^2 + b*x*p' + c*x + d seconds, p' = (1 - windowed) * p + windowed * min(p, window - 1): the prefix "
            "keys read, on average over the stage's layers (the share `windowed` of them with the sliding window)")


def stage_windows(cfg: ModelConfig, ranges) -> list[dict]:
    """Per stage (its layers `ranges`), the `ChunkCost` fields of the model's sliding window: `window` and the
    share of the stage's layers it applies to (none: {})."""
    out = []
    for r in ranges:
        n = sum(i in cfg.window_layers for i in r)
        out.append(dict(window=cfg.sliding_window, windowed=n / len(r)) if n else {})
    return out



class RaggedStepCost:
    """One stage's cost of the steps of a ragged batch (`pipeline.ragged`), from a cost fitted on dense chunks: a
    packed step's attention is each row's own, a·x_b² + b·x_b·p_b (x_b its tokens in the step, p_b its prefix), its
    per-token work c·N over the step's N packed tokens, and one overhead d. The simulator calls it as `cost(N, p)`
    with p the step's start in the packed stream (`chunk_starts` of the steps' token counts), which names the step;
    a token half of a step (tensor parallelism's overlapped schedule splits each step's packed tokens in two,
    `RaggedStep.split`) is named the same way: its first x tokens from the step's start, or its last from p. A (x, p)
    that is neither is an error."""

    def __init__(self, base: ChunkCost, steps):
        self.base = base
        self.by_start = {}
        pos = 0
        for st in steps:
            self.by_start[pos] = st
            pos += st.tokens
        self._starts = sorted(self.by_start)

    def step(self, x, p):
        """The step, or the token half of one, of `x` packed tokens from `p` in the packed stream."""
        x, p = int(x), int(p)
        i = bisect.bisect_right(self._starts, p) - 1
        start = self._starts[i] if i >= 0 else None
        st = self.by_start.get(start)
        if st is not None and st.tokens:
            if (p, x) == (start, st.tokens):
                return st
            if p == start and 0 < x < st.tokens:
                return st.split(x)[0]
            if start < p and p + x == start + st.tokens:
                return st.split(p - start)[1]
        raise ValueError(f"no step (or token half of one) of {x} tokens starts at {p} in this ragged batch")

    def __call__(self, x, p) -> float:
        st, c = self.step(x, p), self.base
        return float(sum(c.a * n * n + c.b * n * c.prefix_read(q) for n, q in zip(st.lengths, st.starts))
                     + c.c * st.tokens + c.d)


def _design(x, p, shape: ChunkCost):
    x = np.asarray(x, dtype=np.float64)
    return np.stack([x * x, x * shape.prefix_read(p), x, np.ones_like(x)], axis=1)


def _too_few(points) -> str | None:
    """What distinct (chunk, prefix) points lack for a `ChunkCost` fit, or None."""
    xs, ps = {x for x, _ in points}, {p for _, p in points}
    if len(points) < 6 or len(xs) < 3 or len(ps) < 2:
        return (f"at least 6 distinct (chunk, prefix) points with 3 chunk lengths and 2 prefix lengths; got "
                f"{len(points)} points, {len(xs)} chunk lengths, {len(ps)} prefix lengths")
    return None


def fit_chunk_cost(samples, window: int | None = None, windowed: float = 0.0) -> ChunkCost:
    """Least-squares fit of `ChunkCost` to measured (chunk_len, prefix_len, seconds) samples, in relative error (a
    1 ms chunk counts as much as a 100 ms one) and with non-negative coefficients (a term the data drives negative is
    dropped and the rest refitted). Samples of the same (x, p) are reduced to their median first: one stalled
    measurement does not bend the fit, and medians add up (the median run of many chunks takes about the sum of
    their median times, while the least time of a run is well above the sum of its chunks' least times, so a
    fit on least times predicts runs too fast). Drop warm-up runs before calling: a first call's compile or
    allocation time is not the chunk's cost. `window` and `windowed`: the stage's sliding window (`ChunkCost`,
    `stage_windows`)."""
    shape = ChunkCost(0.0, 0.0, 0.0, 0.0, window, windowed)
    groups: dict[tuple[int, int], list[float]] = {}
    for x, p, t in samples:
        if x <= 0 or p < 0 or not t >= 0:
            raise ValueError(f"cost sample (chunk={x}, prefix={p}, seconds={t}): chunk must be > 0, prefix >= 0 and "
                             f"time >= 0")
        groups.setdefault((int(x), int(p)), []).append(float(t))
    median = {q: statistics.median(ts) for q, ts in groups.items()}
    points = sorted(q for q in median if median[q] > 0)  # a 0 s time carries no information
    problem = _too_few(points)
    if problem:
        raise ValueError(f"fitting a·x² + b·x·p + c·x + d needs {problem}")
    x = np.array([q[0] for q in points], dtype=np.float64)
    p = np.array([q[1] for q in points], dtype=np.float64)
    t = np.array([median[q] for q in points])
    A = _design(x, p, shape) / t[:, None]  # relative error: (A·θ − t) / t
    # b·x·p needs prefixes that read apart: under a window of 1 in every layer, say, none does (b = 0)
    active = [0, 1, 2, 3] if len(set(shape.prefix_read(p).tolist())) > 1 else [0, 2, 3]
    while True:
        cols = A[:, active]
        scale = np.abs(cols).max(axis=0)  # the columns differ by orders of magnitude (x² vs 1)
        theta, *_ = np.linalg.lstsq(cols / scale, np.ones(len(t)), rcond=None)
        theta = theta / scale
        if (theta >= 0).all():
            break
        active.pop(int(np.argmin(theta)))  # drop the most negative term, refit the rest
        if not active:
            raise ValueError("no non-negative cost model fits these samples")
    coef = [0.0] * 4
    for i, v in zip(active, theta):
        coef[i] = float(v)
    return ChunkCost(*coef, window, windowed)


def fit_link(samples) -> LinkModel:
    """Fits latency + bytes / bandwidth to measured (bytes, seconds) sends, reduced per size to their median; sends
    of at least two sizes are needed to tell the two apart."""
    groups: dict[int, list[float]] = {}
    for nbytes, t in samples:
        if nbytes <= 0 or t < 0:
            raise ValueError(f"link sample (bytes={nbytes}, seconds={t}): bytes must be > 0 and time >= 0")
        groups.setdefault(int(nbytes), []).append(float(t))
    if len(groups) < 2:
        raise ValueError(f"fitting latency + bytes/bandwidth needs sends of at least 2 sizes, got {len(groups)}")
    n = np.array(sorted(groups), dtype=np.float64)
    t = np.array([statistics.median(groups[int(b)]) for b in n])
    slope, intercept = np.polyfit(n, t, 1)
    if slope <= 0:  # no measurable size dependence: all latency, bandwidth unbounded (not emulated)
        return LinkModel(None, max(0.0, float(np.median(t))))
    return LinkModel(1.0 / slope / 1e9, max(0.0, float(intercept)))


# ---- roofline: devices and links not at hand --------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """Nominal datasheet rates (dense bf16, HBM) and the fractions of them the roofline assumes are reached."""
    name: str
    matmul_tflops: float  # dense bf16 tensor-core peak
    hbm_gbps: float  # memory bandwidth, GB/s
    memory_gb: float
    nvlink_gbps: float  # NVLink bandwidth per direction, GB/s
    gemm_efficiency: float = 0.7  # large bf16 GEMMs reach ~70% of peak on Hopper/Ampere
    attention_efficiency: float = 0.5  # FlashAttention-2/3 class kernels: ~50% of peak on long sequences
    memory_efficiency: float = 0.8
    launch_s: float = 4e-6  # per kernel launch (CUDA graphs would shrink it)


DEVICES = {
    "h100": Device("H100 SXM5 80GB", 989.0, 3350.0, 80.0, 450.0),
    "h200": Device("H200 SXM5 141GB", 989.0, 4800.0, 141.0, 450.0),
    "a100": Device("A100 SXM4 80GB", 312.0, 2039.0, 80.0, 300.0),
}

# Per-direction bandwidth (GB/s) and per-send latency (s) a pipeline send sees: nominal rates times ~0.8 for
# protocol overhead (NVLink: the device's own figure, see `link_preset`).
LINK_PRESETS = {
    "pcie4": (32.0 * 0.8, 10e-6),  # PCIe Gen4 x16: 32 GB/s per direction
    "pcie5": (64.0 * 0.8, 10e-6),  # PCIe Gen5 x16: 64 GB/s per direction
    "ib-ndr": (50.0 * 0.8, 5e-6),  # InfiniBand NDR, 400 Gb/s
    "ib-hdr": (25.0 * 0.8, 5e-6),  # InfiniBand HDR, 200 Gb/s
    "400gbe": (50.0 * 0.8, 20e-6),  # RoCE / TCP Ethernet
    "100gbe": (12.5 * 0.8, 20e-6),
}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"unknown device preset {name!r}; choose one of {', '.join(DEVICES)}")
    return DEVICES[name]


def link_preset(name: str, device: str | Device = "h100") -> LinkModel:
    """`nvlink` (the device's NVLink), or one of LINK_PRESETS."""
    if name == "nvlink":
        dev = get_device(device) if isinstance(device, str) else device
        return LinkModel(dev.nvlink_gbps * 0.8, 3e-6)
    if name not in LINK_PRESETS:
        raise ValueError(f"unknown link preset {name!r}; choose one of nvlink, {', '.join(LINK_PRESETS)}")
    bw, lat = LINK_PRESETS[name]
    return LinkModel(bw, lat)


@dataclass(frozen=True)
class RooflineCost:
    """One stage (`layers` layers of `cfg`, plus the head on the last stage) on `device`: each op group takes the
    longer of its FLOPs at the assumed compute rate and its bytes at the assumed memory rate.
    - GEMMs: 2·params·x·B FLOPs; weights read once per chunk;
    - attention: 4·Hq·D·B·(x·p + x(x+1)/2) FLOPs (visible pairs only); the KV of prefix + chunk read once per
      128-query block; in the `windowed` of its layers (a sliding window W: `ModelConfig.window_layers`) each
      query's pairs are at most W, and only the last W + x - 1 positions are read;
    - element-wise (norms, RoPE, SwiGLU, residual): ~(12·H + 4·I)·x·B elements read or written;
    - per layer ~8 kernel launches; the last stage adds the LM head on the chunk's last position (weights read).
    With tp > 1 this is one of T tensor-parallel ranks (`pipeline.tp`): 1/T of the layer's weights, heads and MLP
    columns (KV heads at least one), norms and the head whole; its all-reduces are `TPCost`'s.
    """
    cfg: ModelConfig
    layers: int
    device: Device
    batch: int = 1
    itemsize: int = 2
    last_stage: bool = False
    first_stage: bool = False
    tp: int = 1
    windowed: int = 0  # how many of the layers have the model's sliding window

    def __call__(self, x, p):
        cfg, dev, B, e, T = self.cfg, self.device, self.batch, self.itemsize, self.tp
        x = np.asarray(x, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        gemm_rate = dev.matmul_tflops * 1e12 * dev.gemm_efficiency
        attn_rate = dev.matmul_tflops * 1e12 * dev.attention_efficiency
        mem_rate = dev.hbm_gbps * 1e9 * dev.memory_efficiency
        H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        params = self.layer_params
        gemm = np.maximum(2 * params * x * B / gemm_rate, params * e / mem_rate)
        def attention(pairs, keys):
            kv_bytes = keys * 2 * self.kv_heads * D * e * B * np.ceil(x / 128)
            return np.maximum(4 * cfg.num_heads / T * D * B * pairs / attn_rate, kv_bytes / mem_rate)
        attn = attention(x * p + x * (x + 1) / 2, p + x)
        elementwise = (12 * H + 4 * I / T) * x * B * e / mem_rate
        per_layer = gemm + attn + elementwise + 8 * dev.launch_s
        t = self.layers * per_layer
        if self.windowed:  # query i (position p + i) sees min(p + i + 1, W) positions
            W = cfg.sliding_window
            t = t + self.windowed * (attention(window_pairs(x, p, W), np.minimum(p + x, W + x - 1)) - attn)
        if self.last_stage:  # final norm + LM head on one position per row
            head = cfg.vocab_size * H
            t = t + np.maximum(2 * head * B / gemm_rate, head * e / mem_rate) + 2 * dev.launch_s
        return t

    @property
    def kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.tp)

    @property
    def layer_params(self) -> float:
        """One rank's weights of a layer: 1/T of the q, o and MLP projections, the K and V projections of its
        (possibly replicated) KV heads, the norms whole."""
        cfg, T = self.cfg, self.tp
        H, D = cfg.hidden_size, cfg.head_dim
        return (H * D * 2 * cfg.num_heads + 3 * H * cfg.intermediate_size) / T + H * D * 2 * self.kv_heads + 2 * H

    def memory_bytes(self, max_len: int) -> int:
        """Weights (with the embedding table on the first stage and the head on the last) + KV cache of this stage
        for `max_len` positions (activations not counted); with tp > 1, one rank's."""
        cfg = self.cfg
        table = cfg.vocab_size * cfg.hidden_size  # the embedding on the first stage, the head on the last (a tied
        # head is the same table: one copy when one stage holds both, a copy on each device otherwise)
        tables = self.first_stage + self.last_stage - (self.first_stage and self.last_stage and cfg.tie_embeddings)
        w = self.layers * self.layer_params + tables * table
        kv = self.layers * self.batch * max_len * 2 * self.kv_heads * cfg.head_dim
        return int((w + kv) * self.itemsize)


def roofline_stage_costs(cfg: ModelConfig, stages: int, device: str | Device, batch: int = 1,
                         itemsize: int = 2, tp: int = 1) -> list[RooflineCost]:
    """Per-stage roofline costs for `cfg` split evenly over `stages` (as `split_layers` splits it); with tp > 1,
    one TP rank's compute (wrap in `TPCost` for the all-reduces)."""
    from .stage import split_layers
    dev = get_device(device) if isinstance(device, str) else device
    ranges = split_layers(cfg.num_layers, stages)
    return [RooflineCost(cfg, len(r), dev, batch, itemsize, last_stage=i == len(ranges) - 1, first_stage=i == 0,
                         tp=tp, windowed=sum(i in cfg.window_layers for i in r)) for i, r in enumerate(ranges)]


# ---- calibration: measured samples from a pipeline run ----------------------------------------------------------

def calibration_chunks(prompt_len: int, sizes=None, extra=()) -> list[int]:
    """A chunk plan for fitting: the sizes in turn until the prompt is covered, so every size is seen at several
    prefix lengths (the last chunk takes the remainder). Default sizes: L/128, L/64, L/16, L/8 and L/4 (16, 32,
    128, 256, 512 for L = 2048), and any `extra` sizes shorter than the prompt (the measured modes' own chunks: a
    fit holds best where it was measured; on an H200 a fit without L/2 put chunks of 2048 at L = 4096 at 0.82-0.86 of
    their measured time)."""
    if prompt_len <= 0:
        raise ValueError(f"prompt length must be positive, got {prompt_len}")
    if sizes is None:
        sizes = sorted({max(1, prompt_len // d) for d in (128, 64, 16, 8, 4)} | {int(c) for c in extra
                                                                                 if 0 < c < prompt_len})
    chunks, pos, i = [], 0, 0
    while pos < prompt_len:
        c = min(sizes[i % len(sizes)], prompt_len - pos)
        chunks.append(c)
        pos += c
        i += 1
    return chunks


def check_calibration_length(prompt_len: int, what: str = "--simulate", of: str = "a prompt") -> None:
    """Raises ValueError, before anything runs, where a prompt of `prompt_len` tokens is too short to fit a chunk
    cost on (the calibration runs: `calibration_chunks` and the whole prompt as one chunk)."""
    def too_few(n):  # the distinct (chunk, prefix) points the calibration runs of an n-token prompt give
        chunks = calibration_chunks(n)
        return _too_few(set(zip(chunks, chunk_starts(chunks))) | {(n, 0)})
    if too_few(prompt_len):
        shortest = next(n for n in itertools.count(1) if not too_few(n))
        raise ValueError(f"{what} fits chunk costs on calibration runs of the prompt (chunks of L/128 to L/4 tokens, "
                         f"and the whole): it needs {of} of at least {shortest} tokens, got {prompt_len}")


def samples_from_timeline(events: list[dict], chunks: list[int], start_pos: int = 0):
    """(stage, chunk_len, prefix_len, seconds) per compute event and (stage, bytes_hint_tokens, seconds) per send of
    one measured run's timeline (see `schedule.timeline`)."""
    starts = chunk_starts(chunks, start_pos)
    compute, sends = [], []
    for e in events:
        k = int(e["name"].split()[-1]) if e["lane"] in ("compute", "send") else None
        if e["lane"] == "compute":
            compute.append((e["stage"], chunks[k], starts[k], e["end"] - e["start"]))
        elif e["lane"] == "send":
            sends.append((e["stage"], chunks[k], e["end"] - e["start"]))
    return compute, sends


def fit_from_runs(results, bytes_per_token: int, windows: list[dict] | None = None):
    """Per-stage `ChunkCost` and one `LinkModel` fitted from repeated measured runs (`PrefillResult`s of the same
    pipeline, warm-up already excluded), each point taken at its median time over the repeats. `windows`: per stage,
    its sliding window's `ChunkCost` fields (`stage_windows`; None: no window)."""
    per_stage: dict[int, list] = {}
    link = []
    for r in results:
        compute, sends = samples_from_timeline(r.timeline, r.chunks)
        for s, x, p, t in compute:
            per_stage.setdefault(s, []).append((x, p, t))
        link += [(x * bytes_per_token, t) for _, x, t in sends]
    costs = [fit_chunk_cost(per_stage[s], **(windows[s] if windows else {})) for s in sorted(per_stage)]
    return costs, (fit_link(link) if link else LinkModel())


def stage_max(costs):
    """The cost of the slowest stage for each chunk: what paces a pipeline."""
    return lambda x, p: np.max([c(x, p) for c in costs], axis=0)


# ---- tensor parallelism: a stage's all-reduces ----------------------------------------------------------------

TP_COMMS_MODELLED = ("serial", "overlap", "sequence")
# a sequence-parallel stage's closing all-gather: of the whole chunk (a stage that sends whole boundaries), of its
# last token alone (the last stage: only that token's logits are wanted), or none (a stage that hands on its slices)
CLOSINGS = ("chunk", "token", "none")


def allreduce_s(link: LinkModel, tp: int, payload_bytes):
    """One all-reduce of `payload_bytes` per rank over `tp` ranks on `link`, as the engine's emulated TP interconnect
    times one: latency + the ring's bytes on the wire, 2(T-1)/T of the payload, / bandwidth (numpy broadcasts)."""
    return ring_half_s(link, tp, 2 * np.asarray(payload_bytes, dtype=np.float64))


def ring_half_s(link: LinkModel, tp: int, payload_bytes):
    """One reduce-scatter, or one all-gather, of `payload_bytes` (the whole tensor, per rank) over `tp` ranks on
    `link`: latency + (T-1)/T of the payload / bandwidth, half an all-reduce's bytes (as the engine's emulated TP
    interconnect times them; each call pays the link's whole latency)."""
    wire = (tp - 1) / tp * np.asarray(payload_bytes, dtype=np.float64)
    bw = link.bandwidth_gbps
    return link.latency_s + (wire / (bw * 1e9) if bw else 0.0 * wire)


def window_pairs(x, p, window):
    """The (query, key) pairs of a chunk of x queries after p positions under a sliding window (query i, at position
    p + i, sees min(p + i + 1, window) positions; numpy arrays broadcast)."""
    x, p = np.asarray(x, dtype=np.float64), np.asarray(p, dtype=np.float64)
    full = np.clip(p + x - window + 1, 0, x)  # the queries that see a whole window: the last ones
    ramp = x - full  # the first ones see p + i + 1 < window positions
    return full * window + ramp * p + ramp * (ramp + 1) / 2


def attention_share(cfg: ModelConfig, ragged: RaggedStepCost | None = None, windowed: float = 0.0):
    """(x, p) -> the attention block's share of a layer's FLOPs for a chunk of x tokens after p (qkv, attention and
    wo, against those plus the MLP): where the first of a layer's two all-reduces falls. The same on every TP rank
    (everything is split by T). With `ragged`, (x, p) names a packed step of its batch (or a token half of one) and
    each row attends over its own prefix. `windowed`: the share of the stage's layers with the model's sliding
    window (their attention counts the pairs the window leaves; the share is the layers' average)."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    proj = 2 * H * D * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    scores = 4 * cfg.num_heads * D

    def pairs(n, q):
        causal = n * q + n * (n + 1) / 2
        return causal if not windowed else (1 - windowed) * causal + windowed * window_pairs(n, q, cfg.sliding_window)

    def share(x, p):
        if ragged is not None:
            st = ragged.step(x, p)
            attn = proj * st.tokens + scores * sum(pairs(n, q) for n, q in zip(st.lengths, st.starts))
            return np.float64(attn / (attn + 6 * H * I * st.tokens))
        x, p = np.asarray(x, dtype=np.float64), np.asarray(p, dtype=np.float64)
        attn = proj * x + scores * pairs(x, p)
        return attn / (attn + 6 * H * I * x)
    return share


@dataclass(frozen=True)
class TPCost:
    """A stage split over `tp` tensor-parallel ranks: one rank's chunk compute, `compute(x, p)` (its all-reduces
    left out), plus the 2·`layers` all-reduces of a chunk's [B, x, H] (`bytes_per_token` = B·H·itemsize) over
    `link` (`allreduce_s`).

    - comm "serial": the compute, then each all-reduce in turn: compute + 2·layers·allreduce_s(x);
    - comm "overlap": ISO's schedule, as `pipeline.model` runs it: the chunk in two token halves a, b; per layer the
      compute lane runs attention(a), attention(b), mlp(a), mlp(b) and the communication lane each one's all-reduce
      as soon as it is computed, in that order; mlp(a) waits for a's attention reduce, the next layer's attention(a)
      for a's MLP reduce. Evaluated event by event (exactly, for any costs), with the layer's compute split at
      `attn_share(x, p)`;
    - comm "sequence" (Megatron sequence parallelism, as `pipeline.model` runs it): per layer two reduce-scatters
      and two all-gathers of the chunk padded to T·ceil(x/T) tokens, in turn (`ring_half_s`: together an
      all-reduce's bytes in twice its calls), then the stage's closing all-gather (`closing`: of the whole chunk
      where the stage sends whole boundaries on, of the last token alone on the last stage, none where the stage
      hands on its slices over sharded boundaries). Chunks of fewer tokens than T run serially. The
      norms on 1/T of the tokens are not modelled: the compute is the serial path's. A stage that keeps received
      slices as they arrive (sequence parallel with sharded boundaries) takes no boundary collective: leave
      `boundary_bytes_per_token` at 0 (its chunks shorter than T cross whole: no collective either).

    `busy`: the share of each all-reduce that occupies the compute lane rather than the wire (a CPU's copies and
    sums in gloo, NCCL's kernels on SMs), paid on the compute lane as the all-reduce is posted; `link` is then the
    transfer alone. Serial costs compute + both. Default none: the wire takes it all and the compute lane never
    slows down (what the GPU projection assumes: NCCL's SM share is left out there).

    Splitting a chunk has costs of its own, which the overlapped schedule's two fields describe (defaults: none; a
    CPU fit sets them from an overlapped calibration run, `fit_tp_overlap`):
    - `split_s`: seconds the split adds to the halves' compute, compute(a) + compute(b), per chunk (negative where
      it saves: a fitted per-chunk overhead counts twice in the halves, while part of it, the embedding, the head and
      the stage's bookkeeping, is paid once per chunk); spread evenly over the halves' blocks;
    - `posted_busy`: the share of `busy` that an all-reduce posted asynchronously costs the compute lane. The
      all-reduce does its own work on the communication lane (gloo's thread: copies, sums, wake-ups), then the wire;
      the compute lane, free to go on, still pays this share of that work (cores the two share: 1 = all of it, as if
      blocked; 0 = none).

    `boundary_bytes_per_token` > 0: the stage takes its boundary through a collective over its TP group before
    computing the chunk (`pipeline.tp.BroadcastRecv`, `ShardRecv`): each chunk first pays `boundary_s`, latency + x ·
    boundary_bytes_per_token / bandwidth on `boundary_link` (default `link`: one collective's latency, as a fit per
    call finds it; plus `busy`'s share), on both lanes. The bytes a rank's lane carries per token: the whole
    boundary's for a broadcast (tp_boundary "broadcast"), (T-1)/T of it for the all-gather of 1/T slices
    ("sharded"); `boundary_lane_bytes` gives them. `boundary_sliced` (sharded sends): a chunk of fewer tokens than
    T crosses whole and takes no collective (`pipeline.tp.sliced`).
    """
    compute: object  # cost(x, p) -> seconds
    layers: int
    tp: int
    link: LinkModel
    bytes_per_token: int
    comm: str = "serial"
    attn_share: object = 0.5  # a fraction, or share(x, p)
    busy: LinkModel = LinkModel()
    boundary_bytes_per_token: float = 0
    boundary_link: LinkModel | None = None
    closing: str = "chunk"  # sequence: the stage's closing all-gather (CLOSINGS)
    boundary_sliced: bool = False  # the boundary collective is sharded sends' all-gather: none under T tokens
    split_s: float = 0.0  # overlap: seconds a split chunk adds to its halves' compute (`fit_tp_overlap`)
    posted_busy: float = 1.0  # overlap: the share of `busy` an asynchronous all-reduce keeps on the compute lane

    def __post_init__(self):
        if self.comm not in TP_COMMS_MODELLED:
            raise ValueError(f"TPCost models tp_comm {', '.join(TP_COMMS_MODELLED)}, got {self.comm!r}")
        if self.closing not in CLOSINGS:
            raise ValueError(f"TPCost closing must be one of {', '.join(CLOSINGS)}, got {self.closing!r}")
        if not 0.0 <= self.posted_busy <= 1.0:
            raise ValueError(f"TPCost posted_busy is a share of busy, from 0 to 1; got {self.posted_busy}")

    def reduce_s(self, tokens):
        """The wire's share of one all-reduce of `tokens` tokens."""
        return allreduce_s(self.link, self.tp, np.asarray(tokens, dtype=np.float64) * self.bytes_per_token)

    def busy_s(self, tokens):
        """The compute lane's share of one all-reduce of `tokens` tokens."""
        if not self.busy.active:
            return 0.0 * np.asarray(tokens, dtype=np.float64)
        return allreduce_s(self.busy, self.tp, np.asarray(tokens, dtype=np.float64) * self.bytes_per_token)

    def boundary_s(self, tokens):
        """A received boundary of `tokens` tokens through the TP group's collective (0 with matching sends)."""
        nbytes = np.asarray(tokens, dtype=np.float64) * self.boundary_bytes_per_token
        if not self.boundary_bytes_per_token or self.tp == 1:
            return 0.0 * nbytes
        lanes = (self.link if self.boundary_link is None else self.boundary_link, self.busy)
        paid = sum(m.delay_s(nbytes) if m.active else 0.0 * nbytes for m in lanes)
        return np.where(np.asarray(tokens) >= self.tp, paid, 0.0) if self.boundary_sliced else paid

    def sequence_s(self, tokens):
        """A sequence-parallel chunk's collectives, in turn: 4 per layer and the closing all-gather (unless
        `closing`), each of the chunk padded to a multiple of T, on the wire and the compute lane."""
        T = self.tp
        gather = lambda nbytes: ring_half_s(self.link, T, nbytes) + ring_half_s(self.busy, T, nbytes)  # noqa: E731
        padded = np.ceil(np.asarray(tokens, dtype=np.float64) / T) * T * self.bytes_per_token
        closing = {"chunk": gather(padded), "token": gather(T * self.bytes_per_token + 0.0 * padded),
                   "none": 0.0 * padded}[self.closing]
        return 4 * self.layers * gather(padded) + closing

    def _share(self, x, p):
        return self.attn_share(x, p) if callable(self.attn_share) else np.full_like(x, float(self.attn_share))

    def __call__(self, x, p):
        x = np.asarray(x, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        x, p = np.broadcast_arrays(x, p)
        pre = self.boundary_s(x)
        serial = pre + np.asarray(self.compute(x, p), dtype=np.float64) + 2 * self.layers * (self.reduce_s(x)
                                                                                            + self.busy_s(x))
        if self.comm == "serial" or self.tp == 1:
            return serial if serial.ndim else float(serial)
        if self.comm == "sequence":
            seq = pre + np.asarray(self.compute(x, p), dtype=np.float64) + self.sequence_s(x)
            out = np.where(x >= self.tp, seq, serial)
            return out if out.ndim else float(out)
        xa = np.floor(x / 2)
        xb = x - xa
        pb = p + xa
        n = self.layers
        safe_a = np.maximum(xa, 1)  # chunks of one token are not split: they take the serial path below
        half = self.split_s / 2  # what splitting adds, half to each half's compute (never below none at all)
        ca = np.maximum(np.asarray(self.compute(safe_a, p), dtype=np.float64) + half, 0.0) / n
        cb = np.maximum(np.asarray(self.compute(xb, pb), dtype=np.float64) + half, 0.0) / n
        fa, fb = self._share(safe_a, p), self._share(xb, pb)
        ra, rb = self.reduce_s(safe_a), self.reduce_s(xb)
        ba, bb = self.busy_s(safe_a), self.busy_s(xb)
        q = self.posted_busy
        t = c = pre + np.zeros_like(x)  # compute lane, communication lane: free once the boundary is broadcast
        done_a = done_b = np.zeros_like(x)  # each half's last reduce
        for _ in range(n):
            for work, b, r, half in ((ca * fa, ba, ra, "a"), (cb * fb, bb, rb, "b"), (ca * (1 - fa), ba, ra, "a"),
                                     (cb * (1 - fb), bb, rb, "b")):
                posted = np.maximum(t, done_a if half == "a" else done_b) + work  # the block, then its reduce posted
                t = posted + q * b  # the compute lane pays its share of the all-reduce's own work ...
                c = np.maximum(c, posted) + b + r  # ... which the all-reduce does (then the wire) on its own lane
                if half == "a":
                    done_a = c
                else:
                    done_b = c
        out = np.where(x >= 2, np.maximum(done_a, done_b), serial)
        return out if out.ndim else float(out)


def boundary_lane_bytes(tp_boundary: str, tp: int, bytes_per_token: float) -> float:
    """Per token, what a TP rank's lane carries to take in a stage boundary: nothing with matching sends, the whole
    token once with a broadcast, the other ranks' (T-1)/T of it with the all-gather of sharded sends."""
    if tp == 1 or tp_boundary == "matching":
        return 0.0
    return bytes_per_token * (1.0 if tp_boundary == "broadcast" else (tp - 1) / tp)


def fit_tp_from_runs(results, tp: int, windows: list[dict] | None = None):
    """From measured runs over `tp` TP ranks (`PrefillResult`s whose stage records carry per-chunk all-reduce
    times; serial all-reduces, so the time blocked is the all-reduce's): per-stage `ChunkCost` of the compute alone
    (each chunk's time minus its all-reduces') and the TP interconnect as a `LinkModel` (latency per call +
    ring wire bytes / bandwidth, as `allreduce_s` reads it). `windows` as `fit_from_runs` takes it."""
    per_stage: dict[int, list] = {}
    calls = []
    for r in results:
        for rec in r.records:
            if len(rec.reduce) != len(rec.compute):
                raise ValueError(f"stage {rec.stage}'s record has no per-chunk all-reduce times: not a TP run")
            for x, p, (a, b), red in zip(rec.chunks, chunk_starts(rec.chunks), rec.compute, rec.reduce):
                sec, n, payload = red[:3]
                per_stage.setdefault(rec.stage, []).append((x, p, max(0.0, b - a - sec)))
                if n:
                    calls.append((2 * (tp - 1) / tp * payload / n, sec / n))
    costs = [fit_chunk_cost(per_stage[s], **(windows[s] if windows else {})) for s in sorted(per_stage)]
    return costs, fit_link(calls)


def fit_tp_overlap(results, costs, shares=21, steps=201) -> tuple[float, float]:
    """(split_s, posted_busy) of `TPCost`'s overlapped schedule, fitted to measured runs that used it (`results`:
    `PrefillResult`s with tp_comm "overlap", warm-up excluded) given each stage's cost fitted on serial runs
    (`costs`, one `TPCost` per stage): the pair that brings the schedule's chunk times closest to the measured ones
    (each (stage, chunk, prefix) at its median over runs; least squares in relative error). A grid search: every
    share of `busy` from 1 down to 0 in `shares` steps, and for each `steps` values of split_s from the one that
    would empty the cheapest chunk's halves of compute up to the longest chunk's measured time, refined once around
    the best; on a tie the larger share (the less hidden) wins. Chunks of one token are not split and are left out,
    as are chunks timed at 0 s (no information)."""
    groups: dict[tuple[int, int, int], list[float]] = {}
    for r in results:
        for rec in r.records:
            boundary = rec.boundary or [0.0] * len(rec.chunks)
            for x, p, (a, b), t in zip(rec.chunks, chunk_starts(rec.chunks), rec.compute, boundary):
                if x >= 2:
                    groups.setdefault((rec.stage, int(x), int(p)), []).append(b - a + t)
    median = {k: statistics.median(ts) for k, ts in groups.items()}
    by_stage: dict[int, tuple] = {}
    for s in sorted({s for s, _, _ in median}):
        keys = [k for k in median if k[0] == s and median[k] > 0]
        if keys:
            by_stage[s] = tuple(np.array(v, dtype=np.float64)
                                for v in zip(*[(x, p, median[(s, x, p)]) for _, x, p in keys]))
    if len({(s, x) for s, (xs, _, _) in by_stage.items() for x in xs}) < 2:
        raise ValueError("fitting the overlapped schedule needs split chunks (2 tokens or more) of at least 2 sizes, "
                         "timed above 0 s")
    halves = min(float(np.min(np.asarray(costs[s].compute(np.floor(x / 2), p), dtype=np.float64)
                              + np.asarray(costs[s].compute(x - np.floor(x / 2), p + np.floor(x / 2)),
                                           dtype=np.float64)))
                 for s, (x, p, _) in by_stage.items())
    top = max(float(t.max()) for _, _, t in by_stage.values())

    def error(split, share):
        e = 0.0
        for s, (x, p, t) in by_stage.items():
            cost = dataclasses.replace(costs[s], comm="overlap", split_s=split, posted_busy=share)
            e += float(np.sum((np.asarray(cost(x, p)) / t - 1.0) ** 2))
        return e

    best = (math.inf, 0.0, 1.0)
    for share in np.linspace(1.0, 0.0, shares):
        for split in np.linspace(-halves, top, steps):
            e = error(split, share)
            if e < best[0]:
                best = (e, float(split), float(share))
    step = (top + halves) / (steps - 1)
    for split in np.linspace(best[1] - step, best[1] + step, 21):
        e = error(split, best[2])
        if e < best[0]:
            best = (e, float(split), best[2])
    return best[1], best[2]
