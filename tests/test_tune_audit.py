"""`epmoe tune --audit`: how each entry of a table was timed, the entries the Gluon pipeline could serve that no race
has set against it, and the batch sizes another GPU's table has entries for that this table hides (read from the
JSON; no GPU)."""
import json
import os

import pytest

from epmoe.bench import tune_audit
from epmoe.cli import main

_TILES = {"block_m": 128, "gate_up": {"block_n": 128, "block_k": 128, "group_m": 8, "num_warps": 8, "num_stages": 3},
          "down": {"block_n": 128, "block_k": 128, "group_m": 8, "num_warps": 8, "num_stages": 4}}
_GEMV = {"gate_up_n": 64, "gate_up_k": 128, "down_n": 64, "down_k": 128, "gate_up_warps": 4, "down_warps": 4,
         "gate_up_stages": 4, "down_stages": 4}


def _write(tmp_path, entries, device="NVIDIA H200"):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": device, "torch": "2.11", "triton": "3.6", "date": "2026-12-07",
                                "entries": entries}))
    return str(path)


def _entries():
    gpt_oss_fp8 = "L=128,H=2944,I=2944,k=4,fmt=fp8_block"      # block FP8 pads H = I = 2880 to 2944
    return gpt_oss_fp8, {
        gpt_oss_fp8: {
            "1": dict(_TILES, gemv=_GEMV, measured_ms=0.05),                       # decode, before the race
            "512": dict(_TILES, measured_ms=0.9),                                  # 16 rows an expert: no Gluon
            "4096": dict(_TILES, gluon=True, measured_ms=1.5),                     # Gluon against its tiles
            "8192": dict(_TILES, measured_ms=2.95),                                # kernels only, Gluon could run
        },
        "L=8,H=4096,I=14336,k=2,fmt=fp8_block": {"8192": dict(_TILES, measured_ms=5.0, measured="end_to_end")},
        "L=8,H=4096,I=14336,k=2,fmt=fp8_tensor": {"8192": dict(_TILES, measured_ms=5.0)},    # not Gluon's format
        "L=32,H=7168,I=2048,k=8,fmt=bfloat16": {"8192": dict(_TILES, measured_ms=9.0, copied_from="other.json")},
    }


def test_each_entry_is_labelled_by_how_it_was_timed_and_gluon_gaps_are_flagged(tmp_path):
    key, entries = _entries()
    header, rows = tune_audit.audit_table(_write(tmp_path, entries))
    assert header["device"] == "NVIDIA H200"
    by = {(e.key, e.T): e for e in rows}
    assert by[(key, 1)].runs == "decode kernels" and "decode kernels against its tiles" in by[(key, 1)].timed
    assert by[(key, 4096)].runs == "gluon" and by[(key, 4096)].timed.startswith("Gluon against its tiles")
    assert by[(key, 8192)].timed == "kernel times only, before the race" and by[(key, 8192)].ms == 2.95
    assert by[("L=8,H=4096,I=14336,k=2,fmt=fp8_block", 8192)].raced
    assert "copied from other.json" in by[("L=32,H=7168,I=2048,k=8,fmt=bfloat16", 8192)].timed
    # flagged: Gluon's formats, >= GLUON_MIN_ROWS rows an expert, not a Gluon entry, not raced (a copy counts)
    assert {(e.key, e.T) for e in rows if e.gluon_unraced} == {(key, 8192),
                                                                ("L=32,H=7168,I=2048,k=8,fmt=bfloat16", 8192)}
    # on a GPU the Gluon pipeline cannot run on, nothing is flagged
    _, rows = tune_audit.audit_table(_write(tmp_path, entries, device="NVIDIA A100-SXM4-80GB"))
    assert not any(e.gluon_unraced for e in rows)


def test_the_report_names_the_command_that_races_each_flagged_entry(tmp_path):
    from rich.console import Console
    key, entries = _entries()
    console = Console(record=True, width=400)
    assert tune_audit.report(console, [_write(tmp_path, entries)]) == 2
    text = console.export_text()
    assert "epmoe tune --gluon --presets gpt-oss-120b --formats fp8_block --tokens 8192" in text
    assert ("epmoe tune --gluon --local-experts 32 --hidden 7168 --inter 2048 --top-k 8 --activation silu "
            "--formats bf16 --tokens 8192") in text
    assert f"not raced end to end: {key}: T=1 decode kernels" in text
    assert "7 entries of 4 shapes, 1 raced end to end" in text


def test_shape_flags_and_keys():
    assert tune_audit.shape_flags("L=8,H=4096,I=14336,k=2,fmt=bfloat16") == "--presets mixtral-8x7b --formats bf16"
    assert tune_audit.shape_flags("L=16,H=2048,I=768,k=8,fmt=fp8_block") == (
        "--local-experts 16 --hidden 2048 --inter 768 --top-k 8 --activation silu --formats fp8_block")
    assert tune_audit.shape_flags("L=4,H=100,I=60,k=1,fmt=float16") == (
        "--local-experts 4 --hidden 100 --inter 60 --top-k 1 --formats fp16")
    with pytest.raises(ValueError, match="not a table key"):
        tune_audit.parse_key("L=8,H=4096")


def test_the_package_tables_hold_only_marks_the_audit_knows():
    """Every entry shipped reads as one of the audit's labels (a new mark must be taught to it, not shown raw)."""
    for path in tune_audit.package_tables():
        _, rows = tune_audit.audit_table(path)
        assert rows and not [e for e in rows if e.timed.startswith("measured as")], path


def test_cli_audit_needs_no_gpu_and_refuses_other_modes_and_missing_tables(tmp_path, capsys):
    key, entries = _entries()
    assert main(["tune", "--audit", "--output", _write(tmp_path, entries)]) == 0
    assert "epmoe tune --gluon --presets gpt-oss-120b" in capsys.readouterr().out
    assert main(["tune", "--audit", "--output", str(tmp_path / "none.json")]) == 2
    assert "no table at" in capsys.readouterr().err
    assert main(["tune", "--audit", "--gluon"]) == 2
    assert "separate modes" in capsys.readouterr().err


def test_the_race_arguments_one_line_a_shape_as_the_gpu_script_reads_them(tmp_path, capsys):
    """`python -m epmoe.bench.tune_audit TABLE` (part `gluon_tune` with GLUON_TUNE_SETS=audit): `epmoe tune --gluon`'s
    arguments for each flagged shape, one line each; nothing for a table with none; a missing table refused."""
    key, entries = _entries()
    path = _write(tmp_path, entries)
    assert tune_audit.main([path]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "--presets gpt-oss-120b --formats fp8_block --tokens 8192",
        "--local-experts 32 --hidden 7168 --inter 2048 --top-k 8 --activation silu --formats bf16 --tokens 8192"]
    # a tune rewrites an entry whole: its time marked, no `copied_from` left
    raced = {k: {t: {f: v for f, v in dict(e, measured="end_to_end").items() if f != "copied_from"}
                 for t, e in by_t.items()} for k, by_t in entries.items()}
    assert tune_audit.main([_write(tmp_path, raced)]) == 0
    assert capsys.readouterr().out == ""
    assert tune_audit.main([str(tmp_path / "none.json")]) == 2
    assert "no table at" in capsys.readouterr().err


def test_the_formats_gluon_could_serve_are_the_ones_triton_ws_declares(monkeypatch):
    """The audit asks `triton_ws`'s declared caps which table formats the Gluon pipeline takes, rather than keeping
    a list of its own: BF16, block and per-channel FP8 today, and a format the backend comes to declare is
    audited with it."""
    import dataclasses

    from epmoe.experts.triton_ws import WarpSpecializedExperts
    assert tune_audit.gluon_formats() == {"bfloat16", "fp8_block", "fp8_channel"}
    caps = WarpSpecializedExperts.CAPS
    monkeypatch.setattr(WarpSpecializedExperts, "CAPS", dataclasses.replace(caps, quant=caps.quant | {"fp8_tensor"}))
    assert tune_audit.gluon_formats() == {"bfloat16", "fp8_block", "fp8_channel", "fp8_tensor"}
    monkeypatch.setattr(WarpSpecializedExperts, "CAPS", dataclasses.replace(caps, quant=frozenset({"fp8_block"})))
    assert tune_audit.gluon_formats() == {"fp8_block"}


def _named(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text(json.dumps({"device": "NVIDIA H200", "entries": entries}))
    return str(path)


def _shadowing_tables(tmp_path):
    """This GPU's table holds the deepseek shard at T = 1 and 128 only; the first sibling has it at more batch sizes
    (and a shape this table lacks), the second repeats one of them and adds another."""
    shard, mixtral = "L=32,H=7168,I=2048,k=8,fmt=fp8_block", "L=8,H=4096,I=14336,k=2,fmt=fp8_block"
    own = _named(tmp_path, "own.json", {shard: {"1": _TILES, "128": _TILES}, mixtral: {"1024": _TILES},
                                        "L=8,H=4096,I=14336,k=2,fmt=bfloat16": {}})
    first = _named(tmp_path, "first.json", {shard: {t: _TILES for t in ("0", "1", "16", "512", "1024", "8192")},
                                            mixtral: {"512": _TILES},
                                            "L=8,H=4096,I=14336,k=2,fmt=bfloat16": {"8192": _TILES}})
    second = _named(tmp_path, "second.json", {shard: {"512": _TILES, "2048": _TILES}})
    return shard, own, [first, second]


def test_batch_sizes_another_gpus_table_has_and_this_ones_shape_hides_are_named_with_what_serves_them(tmp_path):
    """The lookup reads the first table that holds a shape, so a shape with few entries here hides the sibling's
    entries at other T: each such T is named once (the first sibling that has it), with this table's entry that
    serves it (the nearest within reach) or the heuristic; T this table has, T = 0, shapes it lacks and shapes it
    holds with no entries (the lookup reads on past those) are not named. The tunes come a shape a line, shapes
    with a batch size the heuristic serves first."""
    shard, own, siblings = _shadowing_tables(tmp_path)
    found = tune_audit.shadowed_entries(own, siblings)
    mixtral = "L=8,H=4096,I=14336,k=2,fmt=fp8_block"
    assert [(s.key, s.T, s.served_by, s.sibling) for s in found] == [
        (shard, 16, 128, "first.json"), (shard, 512, 128, "first.json"), (shard, 1024, 128, "first.json"),
        (shard, 2048, None, "second.json"), (shard, 8192, None, "first.json"), (mixtral, 512, 1024, "first.json")]
    assert tune_audit.shadowed_tune_args(own, siblings) == [
        "--local-experts 32 --hidden 7168 --inter 2048 --top-k 8 --activation silu --formats fp8_block "
        "--tokens 16,512,1024,2048,8192",
        "--presets mixtral-8x7b --formats fp8_block --tokens 512"]
    # without a heuristic-served T the shapes come in key order (the L=8 key after L=32's, by its string) ...
    near = _named(tmp_path, "near.json", {shard: {"512": _TILES}, mixtral: {"2048": _TILES}})
    assert [a.split()[1] for a in tune_audit.shadowed_tune_args(own, [near])] == ["32", "mixtral-8x7b"]
    # ... and a shape with one goes first even where its key sorts last
    far = _named(tmp_path, "far.json", {shard: {"512": _TILES}, mixtral: {"16384": _TILES}})
    assert [a.split()[1] for a in tune_audit.shadowed_tune_args(own, [far])] == ["mixtral-8x7b", "32"]


def test_the_package_tables_of_a_family_are_each_others_siblings():
    """A table named as a GPU's of the Hopper family reads the family's other package tables after it; a table of
    another name has none."""
    from epmoe.kernels.tuning_table import CONFIG_DIR, sibling_tables
    h100 = os.path.join(CONFIG_DIR, "NVIDIA_H100_80GB_HBM3.json")
    h200 = os.path.join(CONFIG_DIR, "NVIDIA_H200.json")
    assert sibling_tables("/elsewhere/NVIDIA_H200.json") == [h100]
    assert sibling_tables(h100) == [h200]
    assert sibling_tables("/elsewhere/table.json") == []


def test_the_report_and_the_script_line_name_the_tunes_of_the_hidden_batch_sizes(tmp_path, monkeypatch, capsys):
    """`epmoe tune --audit` names the hidden batch sizes of a shape with what serves each and the tune that times
    them; `tune_audit --shadowed` prints those tunes, one line a shape, and nothing where no sibling hides any."""
    from rich.console import Console
    shard, own, siblings = _shadowing_tables(tmp_path)
    monkeypatch.setattr(tune_audit, "sibling_tables", lambda path: siblings)
    console = Console(record=True, width=600)
    tune_audit.report(console, [own])
    text = console.export_text()
    assert (f"{shard}: first.json, second.json have between them entries at T=16,512,1024,2048,8192 and this "
            "table has not") in text
    assert "serves T=16 from T=128; T=512 from T=128; T=1024 from T=128; T=2048 from the heuristic" in text
    assert ("epmoe tune --local-experts 32 --hidden 7168 --inter 2048 --top-k 8 --activation silu --formats "
            "fp8_block --tokens 16,512,1024,2048,8192") in text
    capsys.readouterr()
    assert tune_audit.main([own, "--shadowed"]) == 0
    assert capsys.readouterr().out.splitlines() == tune_audit.shadowed_tune_args(own, siblings)
    monkeypatch.setattr(tune_audit, "sibling_tables", lambda path: [])
    assert tune_audit.main([own, "--shadowed"]) == 0 and capsys.readouterr().out == ""
