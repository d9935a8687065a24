"""The GPU's clocks, power and temperature while a point is timed, read by `nvidia-smi` on a side process.

Sustained FP8 work can draw the board to its power limit, and the driver then lowers the SM clock: the same
kernel runs slower in the twentieth repeat than in the first. A median that moved for that reason says
nothing about the kernel, so each timed point carries what the GPU ran at while it was measured: the SM
clock's lowest / median / highest sample, the highest power draw and temperature, and every reason the
driver named for holding the clock down (its "clock event reasons" bitmask, decoded).

Nothing here touches the GPU from this process: `nvidia-smi --loop-ms` samples on its own. A machine without
the tool (a CPU, a container without it) gives no record instead of an error; a tool that starts and gives no
samples leaves its reason in `GpuStateSampler.error`, which the benchmarks print.
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
# the reasons' field: its name since driver R535, and the older name, which the older drivers know only
REASONS_FIELD, OLD_REASONS_FIELD = "clocks_event_reasons.active", "clocks_throttle_reasons.active"
QUERY_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", REASONS_FIELD)
SAMPLE_KEYS = ("sm_mhz", "mem_mhz", "power_w", "temp_c", "reasons")


def decode_reasons(mask: int) -> list[str]:
    """The named bits of a clock-event bitmask, lowest first; bits without a name as hex."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([hex(rest)] if rest else [])


def parse_sample(line: str) -> dict | None:
    """One line of `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`, or None where it
    is not one (a header, a warning) or gives no SM clock; a field the driver reports as N/A is None."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(QUERY_FIELDS):
        return None
    sample = {}
    for key, text in zip(SAMPLE_KEYS, parts):
        try:
            sample[key] = int(text, 16) if key == "reasons" else float(text)
        except ValueError:
            sample[key] = None
    return sample if sample["sm_mhz"] is not None else None


def summarize(samples: list[dict]) -> dict | None:
    """What the samples of one timed stretch say, or None with no samples (a field N/A in every sample:
    None)."""
    if not samples:
        return None

    def known(key):
        return [s[key] for s in samples if s[key] is not None]
    sm = known("sm_mhz")
    mask = 0
    for r in known("reasons"):
        mask |= r
    return {"samples": len(samples), "sm_mhz_min": min(sm), "sm_mhz_median": statistics.median(sm),
            "sm_mhz_max": max(sm), "mem_mhz_min": min(known("mem_mhz"), default=None),
            "power_w_max": max(known("power_w"), default=None), "temp_c_max": max(known("temp_c"), default=None),
            "clock_event_reasons": decode_reasons(mask & ~0x1)}   # idle: the sleeps between runs, not a limit


def describe_state(state: dict | None) -> str:
    """One stretch's record as a log line reads it: "sm 1440-1980 MHz (median 1755) 699 W sw_power_cap" (the
    median, the power and the reasons where the record has them); "" for no record."""
    if not state:
        return ""
    median = state.get("sm_mhz_median")
    power = state.get("power_w_max")
    reasons = state.get("clock_event_reasons")
    return (f"sm {state['sm_mhz_min']:.0f}-{state['sm_mhz_max']:.0f} MHz"
            + ("" if median is None else f" (median {median:.0f})")
            + ("" if power is None else f" {power:.0f} W")
            + (f" {'+'.join(reasons)}" if reasons else ""))


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


def _query_fields(command: str) -> tuple[str, ...]:
    """QUERY_FIELDS with the reasons' field under the name this nvidia-smi knows."""
    try:
        listing = subprocess.run([command, "--help-query-gpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return QUERY_FIELDS
    if REASONS_FIELD in listing or OLD_REASONS_FIELD not in listing:
        return QUERY_FIELDS
    return QUERY_FIELDS[:-1] + (OLD_REASONS_FIELD,)


class GpuStateSampler:
    """`with GpuStateSampler(gpu) as s:` samples GPU `gpu` (nvidia-smi's id of it: `nvidia_smi_id`) every
    `interval_ms` on a side process for as long as the block runs, each sample stamped with this host's
    monotonic clock on arrival. `s.since(t0)` summarizes the samples from a `time.monotonic()` reading to
    now (a timed point's stretch), first waiting a few intervals for the sample that covers now, and
    reaching one interval back: a stretch shorter than the interval still gets the samples around it. None
    where nvidia-smi is absent or gave none then (`s.error` says why where it ran and gave none at all). One
    sampler for a whole run: the tool takes a few hundred milliseconds to start, longer than many a point's
    timing."""

    def __init__(self, gpu: str, interval_ms: int = 20, command: str | None = None):
        self.gpu, self.interval_ms = gpu, interval_ms
        self.command = command if command is not None else shutil.which("nvidia-smi")
        self.samples: list[tuple[float, dict]] = []
        self.error: str | None = None
        self._unparsed: list[str] = []
        self._proc = None
        self._reader = None
        self._lock = threading.Lock()

    def __enter__(self) -> "GpuStateSampler":
        if self.command is None:
            self.error = "nvidia-smi is not on PATH"
            return self
        try:
            self._proc = subprocess.Popen(
                [self.command, f"--id={self.gpu}", f"--query-gpu={','.join(_query_fields(self.command))}",
                 "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            self._proc, self.error = None, f"nvidia-smi did not start: {exc}"
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            s = parse_sample(line)
            with self._lock:
                if s is not None:
                    self.samples.append((time.monotonic(), s))
                elif line.strip() and len(self._unparsed) < 3:
                    self._unparsed.append(line.strip())

    def between(self, t0: float, t1: float) -> dict | None:
        """The samples that arrived between t0 and t1 (host monotonic seconds), summarized."""
        with self._lock:
            return summarize([s for t, s in self.samples if t0 <= t <= t1])

    def since(self, t0: float) -> dict | None:
        """The samples from one interval before t0 to the first that arrives after now (waiting at most four
        intervals for it, while the tool runs), summarized."""
        now = time.monotonic()
        deadline = now + 4 * self.interval_ms / 1e3
        while self._proc is not None and self._proc.poll() is None and time.monotonic() < deadline:
            with self._lock:
                if self.samples and self.samples[-1][0] > now:
                    break
            time.sleep(self.interval_ms / 4e3)
        return self.between(t0 - self.interval_ms / 1e3, time.monotonic())

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        early = self._proc.poll()               # the tool stopped on its own: a refused option, no such GPU
        if early is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=5)
        self._proc.stdout.close()
        if not self.samples:
            how = "ran" if early is None else f"exited with {early}"
            said = f": {' | '.join(self._unparsed)}" if self._unparsed else ""
            self.error = f"nvidia-smi gave no samples (it {how}{said})"
