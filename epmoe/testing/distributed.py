"""Run a function on N local ranks (Gloo on CPU, NCCL with one GPU per rank), with a timeout.

A rank that raises makes the call raise with that rank's traceback; a rank that hangs past the timeout
is killed with the others and reported, instead of hanging the test suite.
"""
from __future__ import annotations

import contextlib
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

# NVLink multicast stays off in every process we start (it can take shared hosts' GPUs out of service).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RanksFailed(RuntimeError):
    """Ranks started by `run_on_ranks` failed: the message has every rank's traceback; `errors` maps a
    rank to its error (first line: `Type: message`), `notes` says which ranks were stopped or hung."""

    def __init__(self, message: str, errors: dict[int, str], notes: list[str]):
        super().__init__(message)
        self.errors, self.notes = errors, notes

    def summary(self) -> str:
        """One line per failed rank, without the tracebacks."""
        lines = [f"rank {r}: {v.strip().splitlines()[0] if v.strip() else 'failed'}" for r, v in self.errors.items()]
        return "\n".join(lines + self.notes)


def _worker(rank: int, world_size: int, backend: str, port: int, fn: Callable, args: tuple,
            queue, timeout_s: float) -> None:
    import datetime

    import torch.distributed as dist
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        with contextlib.suppress(Exception):   # teardown after a failure must not mask the reported error
            if dist.is_initialized():
                dist.destroy_process_group()


def _collect(procs, queue, world_size: int, timeout_s: float, grace_s: float):
    """Wait for every rank's report. Once a rank has failed (reported an error, or died without a
    report), the others get `grace_s` to report, then they are killed: they would only wait for it in a
    collective until the timeout. Returns ({rank: (status, value)}, the first failed rank or None)."""
    import queue as queue_mod
    import time
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while len(results) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value = queue.get(timeout=min(max(deadline - time.monotonic(), 0.01), 0.5))
                results[rank] = (status, value)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    time.sleep(0.2)   # let the queue deliver what a process sent just before it exited
                    while not queue.empty():
                        rank, status, value = queue.get()
                        results[rank] = (status, value)
                    for r in dead:
                        results.setdefault(r, ("error", f"process exited with code {procs[r].exitcode} "
                                                        "without reporting"))
            if failed is None:
                failed = next((r for r, (s, _) in sorted(results.items()) if s == "error"), None)
                if failed is not None:
                    deadline = min(deadline, time.monotonic() + grace_s)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return results, failed


def run_on_ranks(fn: Callable, world_size: int, *args: Any, backend: str | None = None,
                 timeout_s: float = 120.0, grace_s: float = 5.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes in one process group; return the
    per-rank results (must be picklable). `backend`: "gloo", "nccl" or None (NCCL when there are
    enough GPUs, else Gloo). A failing rank stops the others `grace_s` seconds later, not at the
    timeout: the call then raises with every rank's error."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"run_on_ranks: NCCL with {world_size} ranks needs {world_size} GPUs, "
                           f"found {torch.cuda.device_count()}")
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    method = "spawn" if backend == "nccl" or torch.cuda.is_initialized() else "fork"
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, backend, port, fn, args, queue, timeout_s),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results, stopped_after = _collect(procs, queue, world_size, timeout_s, grace_s)
    errors = {r: v for r, (s, v) in sorted(results.items()) if s == "error"}
    missing = [r for r in range(world_size) if r not in results]
    if errors or missing:
        msg = []
        if missing and stopped_after is not None:
            msg.append(f"ranks {missing} were stopped {grace_s:.0f}s after rank {stopped_after} failed "
                       "(they could not finish without it)")
        elif missing:
            msg.append(f"ranks {missing} did not finish within {timeout_s:.0f}s (hang or deadlock); killed")
        raise RanksFailed(f"run_on_ranks({getattr(fn, '__name__', fn)}, {world_size} ranks, {backend}) failed:\n"
                          + "\n".join(msg + [f"--- rank {r} ---\n{v}" for r, v in errors.items()]), errors, msg)
    return [results[r][1] for r in range(world_size)]


LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    """Started by torchrun (or any launcher that sets RANK and WORLD_SIZE)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launcher_env() -> list[str]:
    """The variables by which torchrun (or a launcher like it) marks the processes it started."""
    return [k for k in LAUNCHER_ENV if k in os.environ]


def launch(fn: Callable, ranks: int | None, opts: Any, device_type: str,
           timeout_s: float = 600.0) -> list[Any] | None:
    """Run `fn(rank, world_size, opts)` the way the CLI's jobs run: under torchrun on the ranks it
    started (when `ranks` is None), on `ranks` local processes, or in this process for one rank.

    Returns every rank's result on rank 0 (and in the single-process cases), None on torchrun's other
    ranks.
    """
    backend = "nccl" if device_type == "cuda" else "gloo"
    if ranks is None and under_torchrun():
        import torch.distributed as dist
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        try:
            world, rank = dist.get_world_size(), dist.get_rank()
            results: list[Any] = [None] * world
            dist.all_gather_object(results, fn(rank, world, opts))
        finally:
            dist.destroy_process_group()
        return results if rank == 0 else None
    if ranks is not None and ranks > 1:
        return run_on_ranks(fn, ranks, opts, backend=backend, timeout_s=timeout_s)
    return [fn(0, 1, opts)]
