"""Pictures of a run: a timeline PNG (one row per stage and lane, chunks labelled, sends visible), a Chrome/Perfetto
trace of the same events, and TTFT against prompt length for sweeps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LANE_COLORS = {"compute": "tab:blue", "send": "tab:orange", "wait": "tab:red"}


def row_end_times(events: list[dict], row_end_step: list[int]) -> dict[float, list[int]]:
    """A ragged batch's rows by the time their first token is ready in this timeline: when the last stage finished
    the step each row's prompt ends in (`row_end_step[b]`), in seconds from the start."""
    last = max(e["stage"] for e in events)
    ends = {e["name"]: e["end"] for e in events if e["stage"] == last and e["lane"] == "compute"}
    out: dict[float, list[int]] = {}
    for b, k in enumerate(row_end_step):
        if f"chunk {k}" in ends:
            out.setdefault(ends[f"chunk {k}"], []).append(b)
    return out


def write_timeline_png(timelines: dict[str, list[dict]], path: Path, title: str,
                       row_ends: dict[str, list[int]] | None = None) -> None:
    """One panel per mode; `row_ends` (a ragged batch: per mode, the step each row ends in) marks when each row's
    first token is ready with a dashed line labelled by its rows."""
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
        if row_ends and mode in row_ends and events:
            for t, rows_done in row_end_times(events, row_ends[mode]).items():
                ax.axvline(t * 1e3, color="tab:green", linestyle="--", linewidth=0.9)
                ax.annotate("row " + ",".join(map(str, rows_done)), (t * 1e3, 1.0), xycoords=("data", "axes fraction"),
                            fontsize=6, color="tab:green", ha="right", va="bottom")
        ax.set_title(mode, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time since start (ms)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_chrome_trace(timelines: dict[str, list[dict]], path: Path,
                       row_ends: dict[str, list[int]] | None = None) -> None:
    """Chrome trace event format (open in ui.perfetto.dev or chrome://tracing): one process per mode, one thread
    per stage and lane; with `row_ends` (as `write_timeline_png`), an instant event "row b: first token" on the last
    stage's compute thread when each row's first token is ready."""
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
        if row_ends and mode in row_ends and evs:
            tid = lanes.index((max(e["stage"] for e in evs), "compute"))
            for t, rows_done in row_end_times(evs, row_ends[mode]).items():
                events += [dict(name=f"row {b}: first token", ph="i", s="t", pid=pid, tid=tid, ts=t * 1e6)
                           for b in rows_done]
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
