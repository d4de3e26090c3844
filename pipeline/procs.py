"""Stage processes: start one per stage (spawn, or found already started by torchrun), watch them, and take them all
down together. A failure is reported by the stage that caused it, not by the peer that noticed it:

- a stage that raises reports its error, and its peers' "connection closed" follow-ups are listed after it;
- a stage that dies (a signal, an exit) without a word is named with its exit code or signal;
- a stage that stops answering (SIGSTOP, a hang) is named once its heartbeat (a thread in every stage process that
  stamps a shared clock twice a second) is `STALL_S` old, instead of a healthy peer timing out much later;
- Ctrl-C or SIGTERM in the parent stops every stage at once (the stages start with SIGINT blocked: a Ctrl-C in a
  terminal reaches the whole process group, and the parent alone decides); stages also die with the parent
  (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

STALL_S = 15.0  # a started stage whose heartbeat is this old has stopped answering
START_S = 300.0  # a stage that has not started (imported torch, said hello) after this long has hung while starting
BEAT_S = 0.5


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), which can be fewer than
    the machine's `os.cpu_count()`."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call here (macOS, Windows)
        return os.cpu_count() or 1


class PipelineError(RuntimeError):
    """A stage failed, died or stopped answering; the message names the stage and the cause."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds (and stops the stages) like Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def interrupts_raise():
    """While inside, SIGTERM raises `Terminated` and SIGINT KeyboardInterrupt in the main thread, so that both unwind
    (and stop the stages) instead of killing the process outright; SIGINT even if this process was started with it
    ignored (as a shell starts background jobs: Python keeps an inherited SIG_IGN, and `kill -INT` would do
    nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {signal.SIGTERM: _raise_terminated, signal.SIGINT: signal.default_int_handler}
    old = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def torchrun_rank() -> int | None:
    """This process's rank when started by torchrun (or with a process group already up), else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def init_process_group(spec, rank: int | None = None, world: int | None = None, port: int | None = None):
    """env:// rendezvous (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or an explicit local one."""
    if rank is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    world = int(os.environ["WORLD_SIZE"])
    if world != spec.world_size:
        what = f"the number of stages {spec.num_stages}" if spec.tp == 1 else (
            f"stages x tp = {spec.num_stages} x {spec.tp}")
        raise ValueError(f"world size {world} differs from {what}: launch torchrun --nproc-per-node {spec.world_size}")
    backend = "nccl" if spec.link == "nccl" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=spec.timeout_s))


# ---- in each stage process ---------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed parent leaves no stage behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _beat(beats, rank: int) -> None:
    while True:
        beats[rank] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
        time.sleep(BEAT_S)


def _child(rank, world, port, spec, jobs, q, beats, main):
    _die_with_parent()
    q.put(("started", rank, None))
    threading.Thread(target=_beat, args=(beats, rank), daemon=True, name="heartbeat").start()
    try:
        init_process_group(spec, rank, world, port)
        progress = (lambda *a: q.put(("progress", rank, a))) if rank == 0 else None
        results = main(spec, jobs, progress)
        if rank == 0:  # plain pickle: no shared-memory handles that die with this process
            q.put(("ok", rank, pickle.dumps(results)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # report, then die non-zero: the parent tears the others down
        q.put(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        q.close()
        q.join_thread()  # flush the report before the hard exit
        os._exit(1)


# ---- in the parent ----------------------------------------------------------------------------------------------

GUARD_HINT = ('each stage process re-runs your main module while it starts: put the code that runs the pipeline '
              'under `if __name__ == "__main__":`')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sigint_blocked():
    """Processes started inside begin life with SIGINT blocked (the signal mask survives fork and exec, and Python
    never unblocks it): Ctrl-C in a terminal reaches the whole process group, and must not reach them. This process
    loses nothing: a SIGINT that arrives meanwhile stays pending (or another thread takes it) and is raised as
    KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def signals_deferred():
    """While inside, SIGINT and SIGTERM are noted, not acted on; on leaving, the first one noted is acted on as its
    handler would have (KeyboardInterrupt, `Terminated`, ...). For code that must not be cut in half: a process
    start interrupted between the fork and the hand-over of its arguments leaves a child that dies with a
    traceback of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    old = {sig: signal.signal(sig, lambda s, f: noted.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if noted:
            handler = old[noted[0]]
            if callable(handler):
                handler(noted[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), noted[0])


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "its state is unknown"
    return {"T": "its process is stopped (SIGSTOP or a debugger)", "t": "its process is stopped by a debugger",
            "D": "its process is blocked in the kernel", "Z": "its process has exited"}.get(
        state, "its process is running")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_PEER_ERRORS = ("Connection closed", "Connection reset", "Gloo", "gloo", "NCCL", "Timed out", "timed out")


def _is_peer_error(msg: str) -> bool:
    return any(p in msg.splitlines()[0] for p in _PEER_ERRORS)


def process_name(rank: int, tp: int = 1) -> str:
    """How a failure names process `rank`: its stage, and with tensor parallelism its TP rank too."""
    return f"stage {rank}" if tp == 1 else f"stage {rank // tp} (TP rank {rank % tp}, process {rank})"


def _triage(errors, procs, started, tp: int = 1) -> str:
    """The first cause among the reports and the silent deaths (see the module's docstring)."""
    reported = {r for r, _ in errors}
    name = lambda r: process_name(r, tp)  # noqa: E731
    then = lambda skip: "".join(f"\n(then {name(r)}: {m.splitlines()[0]})" for r, m in errors if r != skip)  # noqa
    for r, p in enumerate(procs):  # a process that died without a word is the likeliest first cause
        if p.exitcode not in (None, 0) and r not in reported:
            if r not in started:
                hint = f"; {GUARD_HINT}" if getattr(sys.modules.get("__main__"), "__file__", None) else ""
                return f"{name(r)} exited ({_exit_text(p.exitcode)}) while starting, before it ran anything{hint}"
            oom = " (the kernel's out-of-memory killer sends SIGKILL: was memory short?)" if p.exitcode == -9 else ""
            return f"{name(r)} died ({_exit_text(p.exitcode)}) without reporting an error{oom}" + then(None)
    first = sorted(errors, key=lambda e: _is_peer_error(e[1]))
    if first and not _is_peer_error(first[0][1]):
        r, msg = first[0]
        return f"{name(r)} failed: {msg}" + then(r)
    silent = [r for r, p in enumerate(procs) if p.exitcode is None and r not in reported]
    if silent:  # every report is a peer's complaint (timed out, connection closed): the silent one is the cause
        r = silent[0]
        return (f"{name(r)} stopped answering ({_process_state(procs[r].pid)}, reported no error); its peers "
                "gave up waiting for it" + then(None))
    r, msg = first[0]
    return f"{name(r)} failed: {msg}" + then(r)


def _main_that_cannot_rerun() -> str | None:
    """The main module's path when a spawned process could not re-run it (`python - < script.py` gives
    '<stdin>'), else None: a module run with -m is re-imported by name, and `python -c` or an interactive session
    (a notebook) has no file to re-run."""
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return None
    path = getattr(main, "__file__", None)
    return None if path is None or os.path.isfile(path) else path


def run_spawned(spec, jobs, main, progress=None):
    """Runs `main(spec, jobs, progress)` in one spawned process per stage (rank = stage) and returns rank 0's
    result. Raises PipelineError naming the stage that failed, died or stopped answering; on any exception here
    (Ctrl-C, SIGTERM as `Terminated`) every stage is killed before it propagates."""
    if getattr(mp.current_process(), "_inheriting", False):  # we are a spawned process re-running __main__
        raise SystemExit(f"prefill-overlap: the pipeline was started while a stage process was starting; {GUARD_HINT}")
    main_path = _main_that_cannot_rerun()
    if main_path is not None:
        raise RuntimeError(f"link={spec.link!r} starts one process per stage, and each re-runs the main module, but "
                           f"{main_path} is not a file it can re-run (a script fed on stdin?): run it from a file, "
                           "or with python -c, or use link='inprocess'")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    S = spec.world_size
    beats = ctx.Array("d", S, lock=False)  # each stage's last heartbeat (time.monotonic); 0 until it starts
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, S, port, spec, jobs, q, beats, main), daemon=True,
                         name=f"stage-{r}") for r in range(S)]
    spawned_at = time.monotonic()
    ok = False
    try:
        with signals_deferred(), sigint_blocked():  # every stage starts whole, with SIGINT blocked
            for p in procs:
                p.start()
        results, errors, started, deadline, error = None, [], set(), None, None
        while results is None and error is None:
            try:
                kind, rank, payload = q.get(timeout=0.2)
            except queue.Empty:
                kind = rank = payload = None
            if kind == "started":
                started.add(rank)
            elif kind == "progress" and progress is not None:
                progress(*payload)
            elif kind == "ok":
                results = pickle.loads(payload)
            elif kind == "error":
                errors.append((rank, payload))
                deadline = deadline or time.monotonic() + 1.0  # collect the peers' reports for a moment
            now = time.monotonic()
            if kind is None and deadline is None:
                if any(p.exitcode not in (None, 0) for p in procs):
                    deadline = now + 1.0
                elif all(p.exitcode == 0 for p in procs):
                    error = "stage processes exited without returning results"
                else:
                    for r, p in enumerate(procs):
                        last = beats[r]
                        limit, since = (STALL_S, last) if last else (START_S, spawned_at)
                        if p.exitcode is None and now - since > limit:
                            error = (f"{process_name(r, spec.tp)} stopped answering: no heartbeat for {now - since:.0f} s "
                                     f"({_process_state(p.pid)})")
                            break
            if error is None and deadline is not None and now > deadline:
                error = _triage(errors, procs, started, spec.tp)
        if error is not None:
            raise PipelineError(error)
        ok = True
        return results
    finally:
        procs = [p for p in procs if p.pid is not None]  # the ones that did start
        if not ok:  # a failure, Ctrl-C or SIGTERM: nothing is left running
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=spec.timeout_s if ok else 5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        q.close()
        q.cancel_join_thread()
