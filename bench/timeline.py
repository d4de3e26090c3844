"""Pictures of a run: a timeline PNG (one row per stage and lane, chunks labelled, sends visible), a Chrome/Perfetto
trace of the same events, and TTFT against prompt length for sweeps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LANE_COLORS = {"compute": "tab:blue", "send": "tab:orange", "wait": "tab:red"}


def write_timeline_png(timelines: dict[str, list[dict]], path: Path, title: str) -> None:
    modes = list(timelines)
    end = max((e["end"] for ev in timelines.values() for e in ev), default=1.0)
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 1.2 + 1.3 * len(modes)), sharex=True, squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        events = timelines[mode]
        rows = sorted({(e["stage"], e["lane"]) for e in events}, key=lambda r: (r[0], ["compute", "send", "wait"]
                                                                               .index(r[1])))
        for y, (stage, lane) in enumerate(rows):
            for e in (e for e in events if e["stage"] == stage and e["lane"] == lane):
                ax.barh(y, (e["end"] - e["start"]) * 1e3, left=e["start"] * 1e3, height=0.8,
                        color=LANE_COLORS[lane], edgecolor="black", linewidth=0.3)
                if lane == "compute" and (e["end"] - e["start"]) > 0.03 * end:
                    ax.text((e["start"] + e["end"]) / 2 * 1e3, y, e["name"].replace("chunk ", "c"), ha="center",
                            va="center", fontsize=7, color="white")
        ax.set_yticks(range(len(rows)), [f"stage {s} {lane}" for s, lane in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(mode, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time since start (ms)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_chrome_trace(timelines: dict[str, list[dict]], path: Path) -> None:
    """Chrome trace event format (open in ui.perfetto.dev or chrome://tracing): one process per mode, one thread
    per stage and lane."""
    events = []
    for pid, (mode, evs) in enumerate(timelines.items()):
        events.append(dict(name="process_name", ph="M", pid=pid, args=dict(name=mode)))
        lanes = sorted({(e["stage"], e["lane"]) for e in evs})
        for tid, (stage, lane) in enumerate(lanes):
            events.append(dict(name="thread_name", ph="M", pid=pid, tid=tid, args=dict(name=f"stage {stage} {lane}")))
        for e in evs:
            tid = lanes.index((e["stage"], e["lane"]))
            events.append(dict(name=e["name"], ph="X", pid=pid, tid=tid, ts=e["start"] * 1e6,
                               dur=(e["end"] - e["start"]) * 1e6))
    path.write_text(json.dumps(dict(traceEvents=events, displayTimeUnit="ms")))


def write_sweep_png(points: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = list(points[0]["modes"])
    for mode in modes:
        xs = [p["prompt_len"] for p in points]
        ax.plot(xs, [p["modes"][mode]["ttft_ms"] for p in points], marker="o", label=mode)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
