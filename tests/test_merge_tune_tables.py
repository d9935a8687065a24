"""benchmarks/merge_tune_tables.py: the after-tables of several tune calls sent from one commit merged into the
package's table; a call from another table, another GPU, a removed entry and one entry changed twice refused,
with the table left as it was."""
import json

import pytest

KEY_A = "L=32,H=7168,I=2048,k=8,fmt=fp8_block"
KEY_B = "L=16,H=2048,I=768,k=8,fmt=fp8_block"


def _cfg(block_m, ms):
    return {"block_m": block_m, "gate_up": {"block_n": 128}, "down": {"block_n": 128}, "measured_ms": ms}


def _table(entries, device="NVIDIA H200", date="2026-12-06"):
    return {"device": device, "date": date, "entries": entries}


BASE = _table({KEY_A: {"1": _cfg(16, 0.1), "512": _cfg(128, 0.8)}, KEY_B: {"128": _cfg(32, 0.06)}})


def _write(path, data):
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def _calls(tmp_path, *afters):
    args = []
    for i, after in enumerate(afters):
        args += ["--call", _write(tmp_path / f"before{i}.json", BASE), _write(tmp_path / f"after{i}.json", after)]
    return args


def _after(changes, date="2026-12-07", device="NVIDIA H200"):
    data = json.loads(json.dumps(BASE))
    for key, T, cfg in changes:
        data["entries"].setdefault(key, {})[T] = cfg
    data.update(date=date, device=device)
    return data


def test_two_calls_merged(tmp_path, benchmark_script, capsys):
    table = _write(tmp_path / "table.json", BASE)
    first = _after([(KEY_A, "512", _cfg(64, 0.7))])
    second = _after([(KEY_B, "128", _cfg(32, 0.05)), (KEY_B, "1", _cfg(16, 0.02)),
                     ("L=8,H=4096,I=14336,k=2,fmt=fp8_block", "1", _cfg(16, 0.12))])
    assert benchmark_script("merge_tune_tables").main([table] + _calls(tmp_path, first, second)) == 0
    merged = json.loads((tmp_path / "table.json").read_text())
    assert merged["entries"][KEY_A] == {"1": _cfg(16, 0.1), "512": _cfg(64, 0.7)}
    assert merged["entries"][KEY_B] == {"1": _cfg(16, 0.02), "128": _cfg(32, 0.05)}     # sorted by T
    assert list(merged["entries"][KEY_B]) == ["1", "128"]
    assert merged["entries"]["L=8,H=4096,I=14336,k=2,fmt=fp8_block"] == {"1": _cfg(16, 0.12)}
    assert merged["date"] == "2026-12-07"
    out = capsys.readouterr().out
    assert out.count(" T=") == 4 and f"{KEY_A} T=512" in out


def test_check_writes_nothing(tmp_path, benchmark_script):
    table = _write(tmp_path / "table.json", BASE)
    before = (tmp_path / "table.json").read_text()
    args = [table, "--check"] + _calls(tmp_path, _after([(KEY_A, "512", _cfg(64, 0.7))]))
    assert benchmark_script("merge_tune_tables").main(args) == 0
    assert (tmp_path / "table.json").read_text() == before


@pytest.mark.parametrize("case", ["same entry twice", "other table", "other gpu", "entry removed"])
def test_refused_and_table_unchanged(tmp_path, benchmark_script, capsys, case):
    table = _write(tmp_path / "table.json", BASE)
    if case == "same entry twice":
        args = _calls(tmp_path, _after([(KEY_A, "512", _cfg(64, 0.7))]), _after([(KEY_A, "512", _cfg(32, 0.75))]))
        said = "changed by two calls"
    elif case == "other table":
        other = json.loads(json.dumps(BASE))
        other["entries"][KEY_B]["128"] = _cfg(64, 0.07)
        args = ["--call", _write(tmp_path / "b.json", other), _write(tmp_path / "a.json", other)]
        said = "is not this table"
    elif case == "other gpu":
        args = _calls(tmp_path, _after([(KEY_A, "512", _cfg(64, 0.7))], device="NVIDIA H100 80GB HBM3"))
        said = "is for NVIDIA H100"
    else:
        after = _after([(KEY_A, "512", _cfg(64, 0.7))])
        del after["entries"][KEY_A]["1"]
        args = _calls(tmp_path, after)
        said = "T=1 is in the table before the call and not after it"
    before = (tmp_path / "table.json").read_text()
    assert benchmark_script("merge_tune_tables").main([table] + args) == 1
    assert said in capsys.readouterr().err
    assert (tmp_path / "table.json").read_text() == before
