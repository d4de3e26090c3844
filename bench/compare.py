"""`python -m bench compare BASE.json NEW.json`: the ratio of every timing, and a non-zero exit when one regresses
past the threshold or a correctness figure fails. Runs of different devices or configurations are refused unless
--force."""
from __future__ import annotations

import json
from pathlib import Path

TIMINGS = ("ttft_ms", "exposed_comm_ms")


def compare(base_path: str, new_path: str, threshold: float = 0.10, force: bool = False) -> int:
    try:
        base, new = (json.loads(Path(p).read_text()) for p in (base_path, new_path))
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare: cannot read results: {e}")
        return 2
    for doc, p in ((base, base_path), (new, new_path)):
        if doc.get("schema_version") != 1:
            print(f"compare: {p} is not a results file of schema version 1")
            return 2
    if not force:
        for key, what in (("device", "devices"), ("config", "configurations")):
            a = base["environment"]["device"] if key == "device" else base["config"]
            b = new["environment"]["device"] if key == "device" else new["config"]
            if a != b:
                print(f"compare: the runs are of different {what} ({a} vs {b}); pass --force to compare anyway")
                return 2
    failed = []
    print(f"{'point':>10} {'mode':>11} {'figure':>16} {'base':>10} {'new':>10} {'ratio':>7}")
    new_points = {(p["prompt_len"], p["batch"]): p for p in new["points"]}
    for bp in base["points"]:
        np_ = new_points.get((bp["prompt_len"], bp["batch"]))
        if np_ is None:
            failed.append(f"point L={bp['prompt_len']} missing from {new_path}")
            continue
        for mode, bm in bp["modes"].items():
            nm = np_["modes"].get(mode)
            if nm is None:
                failed.append(f"mode {mode} missing at L={bp['prompt_len']}")
                continue
            for fig in TIMINGS:
                ratio = nm[fig] / bm[fig] if bm[fig] else float("inf") if nm[fig] else 1.0
                flag = ""
                if fig == "ttft_ms" and ratio > 1 + threshold:
                    flag = "  REGRESSED"
                    failed.append(f"{mode} L={bp['prompt_len']} {fig} x{ratio:.2f}")
                print(f"{'L=' + str(bp['prompt_len']):>10} {mode:>11} {fig:>16} {bm[fig]:>10.2f} {nm[fig]:>10.2f} "
                      f"{ratio:>7.2f}{flag}")
            for check in ("outputs_match", "bytes_exact"):
                if not nm.get(check, False):
                    failed.append(f"{mode} L={bp['prompt_len']}: {check} is false")
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print(f"OK: no timing regressed more than {threshold:.0%}, all correctness checks pass")
    return 0
