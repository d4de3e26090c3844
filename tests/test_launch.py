"""Launching the pipeline as a user does: torchrun, a script of their own, Ctrl-C and SIGTERM, stages that stop
answering, progress on stderr. Each test starts real processes (the behaviour lives in process boundaries)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pipeline import Job, PipelineError, PipelineSpec, run_jobs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
    # a user's shell: no interpreter flag inherited from the test process, the repository importable
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tokens(L=40):
    return torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(0))


# ---- torchrun ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stages,extra", [(2, []), (3, ["--chunk-plan", "balanced", "--granularity", "16"])],
                         ids=["S2", "S3-balanced"])
def test_torchrun_runs_the_demo_one_stage_per_process(stages, extra, tmp_path):
    out = tmp_path / "o"
    args = ["--model", "tiny", "--prompt-len", "128", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    if not extra:
        args += ["--chunk-size", "32"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(stages), "-m", "bench", *args, *extra], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600)
    ours = "\n".join(line for line in res.stderr.splitlines() if "bench" in line)  # torchrun's own lines left out
    assert res.returncode == 0, ours[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["outputs_match"] and summary["bytes_exact"]
    assert res.stdout.count("results:") == 1  # rank 0 alone reports
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] and doc["config"]["stages"] == stages and doc["config"]["torchrun"]
    for mode in ("naive", "chunked", "overlapped"):
        assert doc["points"][0]["modes"][mode]["prefill_bytes_per_boundary"] == [128 * 64 * 4] * (stages - 1)


def test_torchrun_refuses_subcommands_without_a_pipeline(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bench", "machine-check", "--seconds", "0.1"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "runs no pipeline: run it without torchrun" in res.stderr


# ---- a user's script ---------------------------------------------------------------------------------------------

def _readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Using the pieces\n\n```python\n(.*?)```", readme, re.S)
    assert block, "the README lost its Python snippet"
    return block.group(1)


def test_the_readme_snippet_runs_as_a_script(tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(_readme_snippet())
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_script_without_the_main_guard_is_told_so(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import torch
        from pipeline import run_prefill
        run_prefill("tiny", torch.zeros(1, 16, dtype=torch.long), mode="chunked", chunk_size=8, link="gloo")
    """))
    t0 = time.time()
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    assert 'if __name__ == "__main__":' in res.stderr and "PipelineError" in res.stderr
    assert time.time() - t0 < 120


def test_a_script_on_stdin_is_told_it_cannot_be_rerun_before_any_stage_starts(tmp_path, monkeypatch):
    """`python - < script.py`: a spawned stage would re-run '<stdin>', a file that does not exist; refused before
    spawning, naming the ways that work. A main module run with -m, `python -c` or a notebook (no file) is fine."""
    import types

    from pipeline.procs import _main_that_cannot_rerun
    code = textwrap.dedent("""
        import torch
        from pipeline import run_prefill
        run_prefill("tiny", torch.zeros(1, 16, dtype=torch.long), mode="chunked", chunk_size=8, link="gloo")
    """)
    res = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    assert "<stdin> is not a file it can re-run" in res.stderr and "link='inprocess'" in res.stderr
    script = tmp_path / "run.py"
    script.write_text("")
    for main, verdict in [(dict(__file__="<stdin>"), "<stdin>"), (dict(__file__=str(script)), None), ({}, None),
                          (dict(__file__="<stdin>", __spec__=types.SimpleNamespace(name="bench")), None)]:
        module = types.ModuleType("__main__")
        module.__dict__.update({"__spec__": None, **main})
        monkeypatch.setitem(sys.modules, "__main__", module)
        assert _main_that_cannot_rerun() == verdict, main


# ---- faults: the stage that caused it is named ---------------------------------------------------------------------

@pytest.fixture
def quick_stall(monkeypatch):
    import pipeline.procs
    monkeypatch.setattr(pipeline.procs, "STALL_S", 5.0)


def test_a_stopped_stage_is_named_not_the_peer_that_waits_for_it(quick_stall):
    t0 = time.time()
    spec = PipelineSpec(source="tiny", stages=2, link="gloo", threads=1, fault=("stop", 1), timeout_s=600.0)
    with pytest.raises(PipelineError, match=r"stage 1 stopped answering: no heartbeat .* stopped \(SIGSTOP"):
        run_jobs(spec, [Job("chunked", _tokens(), [10] * 4)])
    assert time.time() - t0 < 120  # the heartbeat, not the peer's 600 s timeout


def test_a_hung_stage_is_named_when_its_peer_times_out():
    spec = PipelineSpec(source="tiny", stages=2, link="gloo", threads=1, fault=("hang", 1), timeout_s=5.0)
    with pytest.raises(PipelineError, match=r"stage 1 stopped answering \(its process is running, reported no "
                                            r"error\).*\n\(then stage 0: .*[Tt]imed out"):
        run_jobs(spec, [Job("chunked", _tokens(), [10] * 4)])


# ---- Ctrl-C and SIGTERM ------------------------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids += [int(d.name), *_descendants(int(d.name))]
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig,to,code,word", [
    (signal.SIGINT, "group", 130, "interrupted"),  # Ctrl-C in a terminal: the whole process group
    (signal.SIGINT, "parent", 130, "interrupted"),
    (signal.SIGTERM, "parent", 143, "terminated"),
], ids=["ctrl-c", "sigint", "sigterm"])
def test_an_interrupted_sweep_stops_every_stage_and_keeps_its_finished_points(sig, to, code, word, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--model", "tiny", "--prompt-len", "256,320,384,448",
                             "--chunk-size", "16", "--repeats", "3", "--out", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "results.json").exists():  # the first point is done
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        kids = _descendants(proc.pid)
        while len(kids) < 2:  # the next point's stage processes (and the pause monitor): between two points each
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]  # point spawns anew
            time.sleep(0.05)
            kids = _descendants(proc.pid)
        t0 = time.time()
        os.killpg(proc.pid, sig) if to == "group" else proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and took < 5, (proc.returncode, took, stderr[-2000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"bench: {word}") and "keeps the 1 point(s) finished" in last, stderr[-2000:]
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert not [k for k in kids if _alive(k)], "a process outlived the interrupt"
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is False and [p["prompt_len"] for p in doc["points"]] == [256]


# ---- progress ----------------------------------------------------------------------------------------------------

def test_progress_goes_to_stderr_one_line_per_phase_when_not_a_terminal(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench", "--model", "tiny", "--prompt-len", "64", "--chunk-size",
                          "16", "--repeats", "2", "--out", str(tmp_path / "o")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 4, res.stderr
    assert lines[0].startswith("bench: L=64: 4 mode(s) x (1 warm-up + 2 timed) runs")
    assert "warm-up runs" in lines[1] and "timed runs" in lines[2] and "12 runs done" in lines[3]
    assert "bench:" not in res.stdout  # stdout carries the table and the JSON line only
