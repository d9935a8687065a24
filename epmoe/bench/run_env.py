"""What a multi-rank benchmark ran on (stored with its results), and where its JSON goes by default."""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys

import torch

NVLINK_MULTICAST_SWITCHES = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", CHECKOUT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def source_digest() -> str:
    """sha256 over the library's Python files (paths and contents): names the code that ran even where the
    tree was copied without its git metadata; the same command in a checkout tells which commit it is."""
    root = os.path.join(CHECKOUT, "epmoe")
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, CHECKOUT).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    return h.hexdigest()


def _checkout_head() -> str | None:
    """git's HEAD where epmoe's folder is a checkout of its own; None elsewhere (a copy without git metadata,
    or one lying inside another repository's tree, whose HEAD names other code)."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or os.path.realpath(top) != os.path.realpath(CHECKOUT):
        return None
    return _git("rev-parse", "HEAD")


def provenance() -> dict:
    """The command line of this process, the commit of the code that ran and whether tracked files differ
    from it, and the source digest. `EPMOE_COMMIT`, where set, names the commit (a copy of the tree whose
    git metadata is stale or absent, as on a device machine); else git's HEAD of the checkout."""
    named = os.environ.get("EPMOE_COMMIT")
    commit = None if named else _checkout_head()
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "commit": named or commit,
            "commit_from": "EPMOE_COMMIT" if named else ("git" if commit else None),
            "tracked_files_modified": None if status is None else bool(status),
            "source_sha256": source_digest(),
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_probe_results(output: str | None, device: torch.device, points: list, **meta) -> dict:
    """A GPU probe's results: `meta` headed by the GPU, the torch and Triton versions, the date and
    `provenance()`, printed as one JSON line and, with `output`, written beside its points as JSON."""
    import json

    import triton
    meta = dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), **meta,
                **provenance())
    print(json.dumps(meta), flush=True)
    if output:
        with open(output, "w") as f:
            json.dump(dict(meta=meta, points=points), f, indent=1)
    return meta


def environment(backend: str, ws: int) -> dict:
    """Date, host, Python / torch / triton versions, the process-group backend and ranks, the command,
    commit and source digest (`provenance`); with NCCL the GPU, CUDA and NCCL versions and the NVLink
    multicast switches, otherwise the CPU."""
    now = datetime.datetime.now(datetime.timezone.utc)
    env = {"date": now.strftime("%Y-%m-%d"), "when": now.isoformat(timespec="seconds"), "host": platform.node(),
           "python": platform.python_version(), "torch": torch.__version__, "backend": backend, "ranks": ws,
           "world_size": ws, **provenance()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if backend == "nccl":
        env["device"] = torch.cuda.get_device_name(0)
        env["gpu"] = env["device"]
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        try:
            v = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (AttributeError, RuntimeError):      # a torch built without NCCL
            env["nccl"] = None
        env["nvlink_multicast_off"] = {k: os.environ.get(k) for k in NVLINK_MULTICAST_SWITCHES}
    else:
        env["device"] = "cpu"
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def device_slug(env: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(env.get("device") or "cpu")).strip("-").lower()


# the repository root when epmoe runs from a checkout (an installed copy has no benchmarks/ beside it)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR_HELP = "benchmarks/results of the epmoe checkout when run from inside it, else ./epmoe-results"


def results_dir() -> str:
    """Where results go by default: the checkout's `benchmarks/results` (the repository's record of
    measurements) when the current directory is inside that checkout, else `./epmoe-results`, so that a
    run from anywhere else never writes into a `benchmarks/` folder of somebody else's project."""
    repo_results = os.path.join(CHECKOUT, "benchmarks", "results")
    here = os.path.realpath(os.getcwd()) + os.sep
    if os.path.isdir(repo_results) and here.startswith(os.path.realpath(CHECKOUT) + os.sep):
        return repo_results
    return "epmoe-results"


def default_output(kind: str, env: dict, out_dir: str | None = None) -> str:
    """<out_dir or results_dir()>/<kind>_<device>_<ranks>x_<local time stamp>.json"""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(out_dir or results_dir(), f"{kind}_{device_slug(env)}_{env['world_size']}x_{stamp}.json")


def available_ram() -> int | None:
    """MemAvailable of this machine in bytes (None where /proc/meminfo cannot tell)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
