"""benchmarks/ncu_source_summary.py on a CSV shaped as ncu's source page: the instructions ranked by their
samples, the reasons listed, one table per kernel."""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "ncu_source_summary", os.path.join(HERE, "..", "benchmarks", "ncu_source_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CSV = '''"Kernel Name","ws_grouped_gemm_kernel"
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb"
"0x10","BAR.SYNC.DEFER_BLOCKING 0x1, 0x80","600","590","0"
"0x20","WARPGROUP.ARRIVE","100","0","0"
"0x30","LDG.E R4, [R2]","300","0","280"
"Kernel Name","second"
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb"
"0x10","SYNCS.ARRIVE.TRANS64","10","0","0"
'''


def test_ranks_instructions_and_names_reasons(tmp_path, capsys):
    path = tmp_path / "src.csv"
    path.write_text(CSV)
    assert _tool().main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("== table") == 2
    first = out.split("== table 1")[0]
    assert "1000 warp-stall samples" in first
    lines = [line for line in first.splitlines() if "%  0x" in line]
    assert len(lines) == 2                                      # --top 2
    assert "BAR.SYNC" in lines[0] and "60.0%" in lines[0] and "stall_barrier 590" in lines[0]
    assert "LDG" in lines[1] and "stall_long_sb 280" in lines[1] and "stall_barrier" not in lines[1]
    assert "BAR.SYNC.DEFER_BLOCKING 60.0%" in first             # by opcode


def test_refuses_a_csv_without_samples(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text('"a","b"\n"1","2"\n')
    assert _tool().main([str(path)]) == 1
