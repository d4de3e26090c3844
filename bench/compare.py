"""`python -m bench compare BASE.json NEW.json`: every timing and byte figure of two results files side by side, a
verdict for each, and a non-zero exit when one regresses past the threshold or a correctness figure fails. Runs of
different devices or configurations are refused unless --force (a configuration key that an older file lacks reads
as the value a run without that option records: `CONFIG_DEFAULTS`). Two kernel benchmark files (`kernels.json` of
`python -m bench kernels` or the gpu-suite) are compared per shape and provider (`compare_kernels`; an attention shape
that is launch-bound in either file is gated on its CUDA-graph replay, `triton_graph_ms`, its eager time being the
host's). A directory stands for the one results file in it (a run's --out).

Verdicts: a timing (every figure in ms, per-stage and per-chunk lists element by element; per-run lists are left out,
their medians are compared) REGRESSED when new > base·(1 +
threshold) and the increase is over 1% of the mode's base TTFT (so that the jitter of a 0.1 ms figure does not fail
a run), "faster" in the mirror case, else "same"; bytes must be equal (CHANGED fails); outputs_match and
bytes_exact must hold in the new file."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

FLOOR_OF_TTFT = 0.01  # a timing's increase below this share of the mode's TTFT never counts as a regression
BYTE_FIGURES = ("prefill_bytes_per_boundary", "decode_bytes_per_boundary")
CHECKS = ("outputs_match", "bytes_exact")


class NotComparable(ValueError):
    """The files cannot be compared (unreadable, not results files, different runs without --force)."""


def check_results(doc, p: Path) -> dict:
    """A results file of `python -m bench` (read from p), checked for the structure compare reads."""
    if not isinstance(doc, dict) or doc.get("schema_version") != 1:
        raise NotComparable(f"{p} is not a results file of python -m bench (schema_version 1)")
    points = doc.get("points")
    if not isinstance(points, list) or not points or not all(
            isinstance(pt, dict) and isinstance(pt.get("modes"), dict) and "prompt_len" in pt and "batch" in pt
            for pt in points):
        raise NotComparable(f"{p} has no points with prompt_len, batch and modes: not a complete results file")
    for key in ("environment", "config"):
        if not isinstance(doc.get(key), dict):
            raise NotComparable(f"{p} lacks its {key}")
    return doc


def _timings(m: dict):
    """(name, value) of every timing figure of one mode: scalars and per-stage lists element by element."""
    for key, v in m.items():  # per-run lists are left out: their medians are compared
        if "_ms" not in key or key.endswith("_runs_ms") or key.startswith("sim_"):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, float(v)
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                yield f"{key}[{i}]", float(x)


def _results_file(path) -> Path:
    """A file as given; a directory (a run's --out) by the one results file in it: results.json of python -m bench
    or kernels.json of python -m bench kernels / gpu-suite."""
    p = Path(path)
    if not p.is_dir():
        return p
    found = [p / name for name in ("results.json", "kernels.json") if (p / name).is_file()]
    if len(found) != 1:
        what = "both results.json and kernels.json" if found else "neither results.json nor kernels.json"
        raise NotComparable(f"{p} is a directory with {what}: give the file to compare")
    return found[0]


def _load_json(path) -> tuple[Path, object]:
    """(the file read, its JSON)."""
    p = _results_file(path)
    try:
        return p, json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotComparable(f"cannot read {p} as JSON: {e}") from None


# What a run that does not use an option records in its results' `config`, for the keys the harness added after
# results files were committed: a file that lacks such a key ran with this value (a key not listed here counts as
# null where it is missing: `rows` null is a run of one prompt either way).
CONFIG_DEFAULTS = dict(compress=["none"], sm_partitions=False, tp=1, tp_boundary=["matching"], tp_comm=["serial"],
                       tp_latency_us=0.0, cuda_graphs=False)


def _config_value(config: dict, key):
    """config[key], or for a key the file lacks its `CONFIG_DEFAULTS` value (else null)."""
    return config[key] if key in config else CONFIG_DEFAULTS.get(key)


def _differing_keys(a: dict, b: dict) -> list:
    """The keys whose values differ (a missing key read as `_config_value` reads it)."""
    return [k for k in sorted(set(a) | set(b), key=str) if _config_value(a, k) != _config_value(b, k)]


def _differences(a, b, most: int = 4) -> str:
    """What differs between two values (a configuration's keys one by one), base vs new, in a few words."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return f"{a!r} vs {b!r}"
    keys = _differing_keys(a, b)
    def short(v):
        r = repr(v)
        return r if len(r) <= 40 else r[:37] + "..."
    said = [f"{k} {short(_config_value(a, k))} vs {short(_config_value(b, k))}" for k in keys[:most]]
    return "; ".join(said) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


def _is_kernels(doc) -> bool:
    return isinstance(doc, dict) and (doc.get("kind") == "kernels" or ("attention" in doc and "memory_bound" in doc))


def compare(base_path: str, new_path: str, threshold: float = 0.10, force: bool = False) -> int:
    """Prints the table and the verdicts; returns 0 (all same or better), 1 (a regression or a failed check) or 2
    (not comparable)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (a fraction: 0.1 = 10%), got {threshold!r}")
    try:
        (base_path, base), (new_path, new) = (_load_json(p) for p in (base_path, new_path))
        kinds = [_is_kernels(d) for d in (base, new)]
        if all(kinds):
            return compare_kernels(base, new, threshold, force)
        if any(kinds):
            which, other = (base_path, new_path) if kinds[0] else (new_path, base_path)
            raise NotComparable(f"{which} is a kernel benchmark file (python -m bench kernels) and {other} is not: "
                                "compare two files of the same kind")
        base, new = check_results(base, base_path), check_results(new, new_path)
        if not force:
            for key, what in (("device", "devices"), ("config", "configurations")):
                a = base["environment"].get("device") if key == "device" else base["config"]
                b = new["environment"].get("device") if key == "device" else new["config"]
                if (_differing_keys(a, b) if isinstance(a, dict) and isinstance(b, dict) else a != b):
                    raise NotComparable(f"the runs are of different {what} ({_differences(a, b)}); pass --force to "
                                        "compare anyway")
    except NotComparable as e:
        print(f"bench compare: {e}", file=sys.stderr)
        return 2
    failed, checked, rows = [], set(), []
    key = lambda p: (p["prompt_len"], p["batch"], tuple(p.get("rows") or ()))  # noqa: E731 - ragged: its rows
    new_points = {key(p): p for p in new["points"]}
    for bp in base["points"]:
        where = ("rows=" + ",".join(map(str, bp["rows"]))) if "rows" in bp else f"L={bp['prompt_len']}"
        np_ = new_points.get(key(bp))
        if np_ is None:
            failed.append(f"point {where} B={bp['batch']} missing from {new_path}")
            continue
        for mode, bm in bp["modes"].items():
            nm = np_["modes"].get(mode)
            if nm is None:
                failed.append(f"mode {mode} missing at {where}")
                continue
            floor = FLOOR_OF_TTFT * float(bm.get("ttft_ms") or 0.0)
            new_t = dict(_timings(nm))
            for fig, b in _timings(bm):
                n = new_t.get(fig)
                checked.add(fig.split("[")[0])
                if n is None:
                    failed.append(f"{mode} {where}: {fig} missing")
                    continue
                ratio = n / b if b else (math.inf if n else 1.0)
                if n > b * (1 + threshold) and n - b > floor:
                    verdict = "REGRESSED"
                    failed.append(f"{mode} {where} {fig} x{ratio:.2f}")
                elif b > n * (1 + threshold) and b - n > floor:
                    verdict = "faster"
                else:
                    verdict = "same"
                rows.append((where, mode, fig, f"{b:.2f}", f"{n:.2f}", f"{ratio:.2f}", verdict))
            for fig in BYTE_FIGURES:
                if fig in bm:
                    checked.add(fig)
                    same = bm[fig] == nm.get(fig)
                    rows.append((where, mode, fig, str(bm[fig]), str(nm.get(fig)), "", "same" if same else "CHANGED"))
                    if not same:
                        failed.append(f"{mode} {where}: {fig} changed")
            for check in CHECKS:
                checked.add(check)
                ok = nm.get(check) is True
                rows.append((where, mode, check, str(bm.get(check)), str(nm.get(check)), "", "ok" if ok else "FAILED"))
                if not ok:
                    failed.append(f"{mode} {where}: {check} is {nm.get(check)}")
    head = ("point", "mode", "figure", "base", "new", "ratio", "verdict")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i in (3, 4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"checked: {', '.join(sorted(checked))}")
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print(f"OK: no timing regressed more than {threshold:.0%} (and {FLOOR_OF_TTFT:.0%} of its TTFT), every byte "
          "figure equal, every correctness check holds")
    return 0


# this project's kernels' times (a regression past the threshold fails); every other *_ms figure is a peer's
OURS = ("triton_ms", "triton_graph_ms", "paged_ms", "dense_rows_ms", "dense_rows_graph_ms")
# this project's kernels' errors against float64, checked against the row's tolerance
OUR_ERRORS = ("max_abs_err", "triton_max_abs_err", "paged_max_abs_err", "dense_rows_max_abs_err")


def kernel_rows(doc: dict) -> dict:
    """(kind, shape) -> row: attention rows by (prefix, chunk), sliding-window rows by (prefix, chunk, window), paged
    rows by their batch of (prefix+chunk) rows and page size, memory-bound rows by op."""
    rows = {}
    for r in doc.get("attention", []):  # the launcher's work replayed from a CUDA graph: the kernels' time alone
        graph = r.get("launch_graph_us")
        rows[("attention", f"P={r['prefix']} C={r['chunk']}")] = r | (
            {"triton_graph_ms": graph / 1e3} if isinstance(graph, (int, float)) else {})
    for r in doc.get("window", []):
        rows[("window", f"P={r['prefix']} C={r['chunk']} W={r['window']}")] = r
    for r in doc.get("paged", []):
        rows[("paged", f"paged {','.join(f'{p}+{c}' for p, c in r['batch'])} page={r['page_size']}")] = r
    for r in doc.get("memory_bound", []):
        rows[("memory-bound", r["op"])] = r
    return rows


def host_bound_pair(b: dict, n: dict) -> bool:
    """Whether two `kernel_rows` attention rows of one shape are compared by their CUDA-graph replays: the shape is
    launch-bound in either (the launcher back to back over the kernels: the eager time is the host's, which another
    machine's CPU moves) and both replayed the kernels from a graph."""
    from .kernels import launch_bound  # here, not at the top: bench.kernels imports torch (seconds of start-up)
    return (launch_bound(b) or launch_bound(n)) and "triton_graph_ms" in b and "triton_graph_ms" in n


def dense_rows_host_bound(b: dict, n: dict, threshold: float) -> bool:
    """Whether two paged rows' dense-per-row figures are compared by their CUDA-graph replays: both files replayed
    them, and in either the eager time is over the replay's by more than `threshold` (`dense_rows_launch_bound`)."""
    from .kernels import dense_rows_launch_bound  # here, not at the top: bench.kernels imports torch
    both = all(isinstance(r.get("dense_rows_graph_ms"), (int, float)) for r in (b, n))
    return both and any(dense_rows_launch_bound(r, threshold) for r in (b, n))


def compare_kernels(base: dict, new: dict, threshold: float = 0.10, force: bool = False) -> int:
    """Two kernel benchmark files, per shape and provider: the time of chunk_attention (dense, with a sliding window,
    and paged on a mixed batch, with the dense kernel run per row) or of a Triton memory-bound op REGRESSED past the
    threshold fails (exit 1), and so does a kernel whose error is over its tolerance; the peers' (SDPA, flex, torch
    eager) times get a verdict each but never fail the run: they are the yardstick. A shape of the base missing from
    the new file fails; a memory-bound op that moved other bytes (the benchmark's workload changed) is shown, not
    compared. Files of different devices are refused unless `force`. Older files (no schema_version: SDPA peers
    only) are read too."""
    for doc in (base, new):
        if doc.get("schema_version", 0) not in (0, 1):
            raise NotComparable(f"kernel benchmark file of unknown schema_version {doc.get('schema_version')}")
    dev = [(d.get("environment") or {}).get("device") for d in (base, new)]
    if not force and dev[0] != dev[1]:
        raise NotComparable(f"the runs are of different devices ({dev[0]!r} vs {dev[1]!r}); pass --force to compare "
                            "anyway")
    failed, rows = [], []
    new_rows = kernel_rows(new)
    # the flex peer compiled per shape (static) or once for every shape (dynamic, files before flex_compile)
    flex_compiles = [d.get("flex_compile", "dynamic") for d in (base, new)]
    for key, b in kernel_rows(base).items():
        n = new_rows.get(key)
        if n is None:
            failed.append(f"{key[0]} {key[1]} missing from the new file")
            continue
        if b.get("bytes") != n.get("bytes"):  # a memory-bound op measured on other work: the times say nothing
            rows.append((key[1], "bytes", str(b.get("bytes")), str(n.get("bytes")), "", "other work: not compared"))
            continue
        # a launch-bound figure (the host's time, which another machine's CPU moves) is reported, its graph replay
        # gates: an attention shape's triton_ms, a paged batch's dense rows
        eager = {"attention": "triton_ms" if host_bound_pair(b, n) else None,
                 "paged": "dense_rows_ms" if dense_rows_host_bound(b, n, threshold) else None}.get(key[0])
        for fig in sorted(k for k in b if k.endswith("_ms") and isinstance(b[k], (int, float)) and b[k]):
            ours = fig in OURS and fig != eager
            if not isinstance(n.get(fig), (int, float)) or not n[fig]:
                rows.append((key[1], fig, f"{b[fig]:.4f}", "-", "", "did not run"))
                if ours:
                    failed.append(f"{key[1]} {fig} did not run")
                continue
            ratio = n[fig] / b[fig]
            verdict = "same"
            if ratio > 1 + threshold:
                verdict = "REGRESSED" if ours else "peer slower"
                if ours:
                    failed.append(f"{key[1]} {fig} x{ratio:.2f}")
            elif ratio < 1 / (1 + threshold):
                verdict = "faster" if ours else "peer faster"
            if fig == "flex_ms" and flex_compiles[0] != flex_compiles[1]:
                verdict += f" (flex compiled {flex_compiles[0]} vs {flex_compiles[1]})"
            if fig == eager:
                verdict = {"peer slower": "slower", "peer faster": "faster"}.get(verdict, verdict) \
                    + f" (launch-bound: the host's time; {fig.replace('_ms', '_graph_ms')} gates)"
            rows.append((key[1], fig, f"{b[fig]:.4f}", f"{n[fig]:.4f}", f"{ratio:.2f}", verdict))
        tol = n.get("peer_tolerance", n.get("tolerance"))
        for fig in OUR_ERRORS:
            err = n.get(fig)
            if tol is not None and err is not None and not err <= tol:
                failed.append(f"{key[1]}: {fig} {err:.1e} over the tolerance {tol:.0e}")
        if n.get("paged_correct") is False and tol is None:  # an older paged row: its verdict alone
            failed.append(f"{key[1]}: paged kernel incorrect (paged_correct false)")
    head = ("shape", "figure", "base ms", "new ms", "ratio", "verdict")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i in (2, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print(f"OK: no kernel of this project regressed more than {threshold:.0%}; every error within its tolerance")
    return 0

