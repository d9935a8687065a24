"""The GPU's clocks, power and temperature while a point is timed, read by `nvidia-smi` on a side process.

Sustained FP8 work can draw the board to its power limit, and the driver then lowers the SM clock: the same
kernel runs slower in the twentieth repeat than in the first. A median that moved for that reason says
nothing about the kernel, so each timed point carries what the GPU ran at while it was measured: the SM
clock's lowest / median / highest sample, the highest power draw and temperature, and every reason the
driver named for holding the clock down (its "clock event reasons" bitmask, decoded).

Nothing here touches the GPU from this process: `nvidia-smi -lms` samples on its own, and a machine
without it (a CPU, a container without the tool) gives no record instead of an error.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

# nvidia-smi's clock event reasons (nvml.h, nvmlClocksEventReason*), the bits a timing can meet
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
QUERY_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active")


def decode_reasons(mask: int) -> list[str]:
    """The named bits of a clock-event bitmask, lowest first; bits without a name as hex."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([hex(rest)] if rest else [])


def parse_sample(line: str) -> dict | None:
    """One line of `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`, or None where it
    is not one (a header, a warning, a field the driver reports as N/A)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(QUERY_FIELDS):
        return None
    try:
        return {"sm_mhz": float(parts[0]), "mem_mhz": float(parts[1]), "power_w": float(parts[2]),
                "temp_c": float(parts[3]), "reasons": int(parts[4], 16)}
    except ValueError:
        return None


def summarize(samples: list[dict]) -> dict | None:
    """What the samples of one timed stretch say, or None with no samples."""
    if not samples:
        return None
    sm = [s["sm_mhz"] for s in samples]
    mask = 0
    for s in samples:
        mask |= s["reasons"]
    return {"samples": len(samples), "sm_mhz_min": min(sm), "sm_mhz_median": statistics.median(sm),
            "sm_mhz_max": max(sm), "mem_mhz_min": min(s["mem_mhz"] for s in samples),
            "power_w_max": max(s["power_w"] for s in samples), "temp_c_max": max(s["temp_c"] for s in samples),
            "clock_event_reasons": decode_reasons(mask & ~0x1)}   # idle: the sleeps between runs, not a limit


def nvidia_smi_id(device) -> str:
    """nvidia-smi's name for torch's CUDA device `device`: its UUID ("GPU-..."). torch numbers the devices it
    sees after CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER; nvidia-smi numbers every GPU of the machine by bus:
    the two indices can name different GPUs, the UUID cannot. The index where torch gives no UUID."""
    import torch
    index = torch.device(device).index or 0
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return str(index)
    if not uuid:
        return str(index)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid


class GpuStateSampler:
    """`with GpuStateSampler(gpu) as s:` samples GPU `gpu` (nvidia-smi's id of it: `nvidia_smi_id`) every
    `interval_ms` on a side process for as long as the block runs, each sample stamped with this host's
    monotonic clock on arrival; `s.between(t0, t1)` summarizes those that arrived between two
    `time.monotonic()` readings (a timed point's stretch), None where nvidia-smi is absent or gave none then.
    One sampler for a whole run: the tool takes a few hundred milliseconds to start, longer than many a
    point's timing."""

    def __init__(self, gpu: str, interval_ms: int = 20, command: str | None = None):
        self.gpu, self.interval_ms = gpu, interval_ms
        self.command = command if command is not None else shutil.which("nvidia-smi")
        self.samples: list[tuple[float, dict]] = []
        self._proc = None
        self._reader = None
        self._lock = threading.Lock()

    def __enter__(self) -> "GpuStateSampler":
        if self.command is None:
            return self
        try:
            self._proc = subprocess.Popen(
                [self.command, f"--id={self.gpu}", f"--query-gpu={','.join(QUERY_FIELDS)}",
                 "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            s = parse_sample(line)
            if s is not None:
                with self._lock:
                    self.samples.append((time.monotonic(), s))

    def between(self, t0: float, t1: float) -> dict | None:
        with self._lock:
            return summarize([s for t, s in self.samples if t0 <= t <= t1])

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._reader.join(timeout=5)
