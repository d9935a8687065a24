"""The GPU-state sampler's reading of nvidia-smi, on the CPU: the line format, the reasons bitmask, the
summary of a stretch, the GPU's name, and the side process driven by stand-ins for the tool (one that
samples, one of an older driver, one that refuses its options)."""
import os
import stat
import sys
import time

import pytest

from epmoe.bench.gpu_state import (OLD_REASONS_FIELD, REASONS_FIELD, GpuStateSampler, decode_reasons, describe_state,
                                   nvidia_smi_id, parse_sample, summarize)


def test_parse_sample_reads_the_query_fields_and_skips_other_lines():
    assert parse_sample("1980, 3201, 655.12, 61, 0x0000000000000004\n") == {
        "sm_mhz": 1980.0, "mem_mhz": 3201.0, "power_w": 655.12, "temp_c": 61.0, "reasons": 4}
    assert parse_sample("clocks.current.sm [MHz], clocks.current.memory [MHz], a, b, c") is None
    assert parse_sample("1980, 3201, 600") is None
    # a field the driver cannot read is None, the rest kept; without the SM clock the line says nothing
    assert parse_sample("1980, 3201, [N/A], 61, 0x0") == {
        "sm_mhz": 1980.0, "mem_mhz": 3201.0, "power_w": None, "temp_c": 61.0, "reasons": 0}
    assert parse_sample("[N/A], 3201, 600, 61, 0x0") is None


def test_decode_reasons_names_bits_and_keeps_unknown_ones():
    assert decode_reasons(0) == []
    assert decode_reasons(0x4 | 0x20) == ["sw_power_cap", "sw_thermal_slowdown"]
    assert decode_reasons(0x4 | 0x10000) == ["sw_power_cap", "0x10000"]


def test_summarize_takes_extremes_and_ors_the_reasons_but_not_idle():
    s = [dict(sm_mhz=1980, mem_mhz=3201, power_w=300, temp_c=50, reasons=0x1),
         dict(sm_mhz=1755, mem_mhz=3201, power_w=699, temp_c=63, reasons=0x4),
         dict(sm_mhz=1830, mem_mhz=3201, power_w=650, temp_c=62, reasons=0x0)]
    got = summarize(s)
    assert got == {"samples": 3, "sm_mhz_min": 1755, "sm_mhz_median": 1830, "sm_mhz_max": 1980,
                   "mem_mhz_min": 3201, "power_w_max": 699, "temp_c_max": 63, "clock_event_reasons": ["sw_power_cap"]}
    assert summarize([]) is None
    no_power = [dict(s[1], power_w=None)]
    assert summarize(no_power)["power_w_max"] is None and summarize(no_power)["sm_mhz_min"] == 1755


def _stand_in(tmp_path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!{sys.executable}\nimport sys, time\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


SAMPLING = (
    "if '--help-query-gpu' in sys.argv:\n"
    "    print({listing!r}); sys.exit(0)\n"
    "assert '--id=GPU-1234' in sys.argv, sys.argv\n"
    "assert any(a.startswith('--query-gpu=clocks.sm,') and a.endswith({field!r}) for a in sys.argv), sys.argv\n"
    "i = 0\n"
    "while True:\n"
    "    print(f'{{1900 - i}}, 3201, {{600 + i}}, 60, 0x4' if i % 2 else 'junk line', flush=True)\n"
    "    i += 1\n"
    "    time.sleep(0.01)\n")


@pytest.mark.skipif(os.name != "posix", reason="the stand-ins are scripts with a shebang")
@pytest.mark.parametrize("listing, field", [(f"clocks.sm\n{REASONS_FIELD}\n{OLD_REASONS_FIELD}", REASONS_FIELD),
                                            (f"clocks.sm\n{OLD_REASONS_FIELD}", OLD_REASONS_FIELD)])
def test_sampler_collects_samples_in_a_window_and_stops_its_process(tmp_path, listing, field):
    """The reasons' field under the name the tool lists (an older driver knows only the old one); samples
    between two readings of the clock; the side process gone after the block."""
    tool = _stand_in(tmp_path, SAMPLING.format(listing=listing, field=field))
    with GpuStateSampler("GPU-1234", interval_ms=10, command=tool) as sampler:
        deadline = time.monotonic() + 20
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        time.sleep(0.2)
        t1 = time.monotonic()
        short = sampler.since(time.monotonic())      # a stretch shorter than the interval still gets a sample
        proc = sampler._proc
    assert proc.poll() is not None and sampler.error is None
    got = sampler.between(t0, t1)
    assert got is not None and got["samples"] >= 2
    assert got["clock_event_reasons"] == ["sw_power_cap"] and got["sm_mhz_min"] < got["sm_mhz_max"]
    assert short is not None and short["samples"] >= 1
    assert sampler.between(t1 + 100, t1 + 200) is None  # nothing arrived then


@pytest.mark.skipif(os.name != "posix", reason="the stand-ins are scripts with a shebang")
def test_a_tool_that_refuses_leaves_its_reason(tmp_path):
    tool = _stand_in(tmp_path, "print('Invalid combination of input arguments.', flush=True)\nsys.exit(2)\n")
    with GpuStateSampler("GPU-1234", interval_ms=10, command=tool) as sampler:
        time.sleep(0.3)
        assert sampler.since(time.monotonic()) is None
    assert sampler.samples == [] and "exited with 2" in sampler.error and "Invalid combination" in sampler.error


def test_sampler_without_the_tool_gives_no_record():
    with GpuStateSampler("0", command="/nonexistent/nvidia-smi") as sampler:
        assert sampler.since(time.monotonic()) is None      # no process: nothing to wait for
    assert sampler.samples == [] and sampler.between(0, time.monotonic()) is None
    assert "did not start" in sampler.error


def test_the_gpu_is_named_to_nvidia_smi_by_its_uuid(monkeypatch):
    """torch's index and nvidia-smi's can name different GPUs (CUDA_VISIBLE_DEVICES renumbers torch's): the
    UUID, with nvidia-smi's prefix, names the one torch runs on; the index where torch has no UUID."""
    import torch

    class Props:
        def __init__(self, uuid):
            self.uuid = uuid
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: seen.append(i) or Props("5fc1b3b8-aa"))
    assert nvidia_smi_id(torch.device("cuda", 3)) == "GPU-5fc1b3b8-aa" and seen == [3]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props("GPU-77"))
    assert nvidia_smi_id("cuda:0") == "GPU-77"

    def no_gpu(i):
        raise RuntimeError("no CUDA GPUs are available")
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_gpu)
    assert nvidia_smi_id(torch.device("cuda", 2)) == "2"


def test_a_stretch_is_described_in_one_line_with_what_its_record_has():
    """The log line of a stretch: its SM clock's range, then its median, highest power and the reasons the driver
    held the clock down, each left out where the record has none; nothing for no record."""
    state = summarize([{"sm_mhz": 1980.0, "mem_mhz": 2619.0, "power_w": 512.0, "temp_c": 50.0, "reasons": 0x1},
                       {"sm_mhz": 1755.0, "mem_mhz": 2619.0, "power_w": 699.6, "temp_c": 61.0, "reasons": 0x4},
                       {"sm_mhz": 1440.0, "mem_mhz": 2619.0, "power_w": None, "temp_c": 62.0, "reasons": 0xC}])
    assert describe_state(state) == "sm 1440-1980 MHz (median 1755) 700 W sw_power_cap+hw_slowdown"
    assert describe_state(dict(state, power_w_max=None, clock_event_reasons=[], sm_mhz_median=None)) == \
        "sm 1440-1980 MHz"
    assert describe_state(None) == "" and describe_state(summarize([])) == ""


def test_the_tuners_race_samples_the_gpu_it_runs_on_and_nothing_on_a_cpu(monkeypatch):
    """`epmoe tune`'s end-to-end race keeps a sampler of the GPU its weights are on (named as nvidia-smi names it),
    not started until the race enters it; on the CPU none."""
    import torch

    from epmoe.bench import tune
    assert tune._race_sampler(torch.device("cpu")) is None and tune._race_sampler("cpu") is None
    monkeypatch.setattr(tune, "nvidia_smi_id", lambda device: f"GPU-of-{torch.device(device).index}")
    sampler = tune._race_sampler(torch.device("cuda", 1))
    assert isinstance(sampler, GpuStateSampler) and sampler.gpu == "GPU-of-1" and sampler._proc is None
