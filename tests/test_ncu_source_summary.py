"""benchmarks/ncu_source_summary.py on a CSV shaped as ncu's source page: the instructions ranked by their
samples, the reasons listed, one table per kernel."""


CSV = '''"Kernel Name","ws_grouped_gemm_kernel"
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb"
"0x10","BAR.SYNC.DEFER_BLOCKING 0x1, 0x80","600","590","0"
"0x20","WARPGROUP.ARRIVE","100","0","0"
"0x30","LDG.E R4, [R2]","300","0","280"
"Kernel Name","second"
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb"
"0x10","SYNCS.ARRIVE.TRANS64","10","0","0"
'''


def test_ranks_instructions_and_names_reasons(tmp_path, capsys, benchmark_script):
    path = tmp_path / "src.csv"
    path.write_text(CSV)
    assert benchmark_script("ncu_source_summary").main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("== table") == 2
    first = out.split("== table 1")[0]
    assert "1000 warp-stall samples" in first
    lines = [line for line in first.splitlines() if "%  0x" in line]
    assert len(lines) == 2                                      # --top 2
    assert "BAR.SYNC" in lines[0] and "60.0%" in lines[0] and "stall_barrier 590" in lines[0]
    assert "LDG" in lines[1] and "stall_long_sb 280" in lines[1] and "stall_barrier" not in lines[1]
    assert "BAR.SYNC.DEFER_BLOCKING 60.0%" in first             # by opcode


def test_skips_the_header_lines_the_device_script_writes_above_the_csv(tmp_path, capsys, benchmark_script):
    """benchmarks/gpu_one_h200.sh heads the source page with '# command: ...' lines (commas in them): they
    start no table and add no rows, so the summary is that of the CSV alone."""
    plain, headed = tmp_path / "plain.csv", tmp_path / "headed.csv"
    plain.write_text(CSV)
    headed.write_text("# command: ncu -i ws_gemm.ncu-rep --page source --csv, --print-source sass\n"
                      "# gpu: NVIDIA H100 80GB HBM3, 580.00\n" + CSV)
    tool = benchmark_script("ncu_source_summary")
    assert tool.main([str(plain)]) == 0
    expected = capsys.readouterr().out
    assert tool.main([str(headed)]) == 0
    assert capsys.readouterr().out == expected
    assert [len(rows) for _, rows in tool.tables(str(headed))] == [3, 1]


def test_refuses_a_csv_without_samples(tmp_path, benchmark_script):
    path = tmp_path / "other.csv"
    path.write_text('"a","b"\n"1","2"\n')
    assert benchmark_script("ncu_source_summary").main([str(path)]) == 1


LOOPS = '''"Kernel Name","ws_grouped_gemm_kernel"
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_no_inst"
"0x00","S2R R0, SR_TID.X","10","0","10"
"0x10","LDG.E R4, [R2]","20","0","0"
"0x20","SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R1], R2","30","30","0"
"0x30","QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24","100","0","0"
"0x40","WARPGROUP.DEPBAR.LE gsb0, 0x0","200","200","0"
"0x50","@P0 BRA 0x20","40","0","0"
"0x60","FFMA R1, R2, R3, R4","300","0","300"
"0x70","@P1 BRA 0x10","100","0","100"
"0x80","EXIT","200","0","0"
'''


def test_splits_each_k_loop_from_its_tile_loop(tmp_path, benchmark_script):
    """The K loop (the innermost loop issuing a GMMA: 0x20-0x50), the tile loop's code before it (0x10)
    and after it (0x60-0x70, the epilogue), each with its share and its top reasons."""
    path = tmp_path / "loops.csv"
    path.write_text(LOOPS)
    tool = benchmark_script("ncu_source_summary")
    header, rows = next(iter(tool.tables(str(path))))
    out = tool.regions(header, rows)
    assert "K loop at 0x20:" in out
    assert "before it in the tile loop (set-up): 1 instructions, 2.0% of samples" in out
    assert "the K loop: 4 instructions, 37.0% of samples [barrier 62%]" in out
    assert "after it in the tile loop (epilogue): 2 instructions, 40.0% of samples [no_inst 100%]" in out


def test_names_the_run_behind_the_csv(tmp_path, capsys, benchmark_script):
    """`--source-log`: the header lines of the run that made the CSV, then this summary's command; a gzipped
    CSV reads the same."""
    import gzip
    path = tmp_path / "loops.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(LOOPS)
    log = tmp_path / "run.log"
    log.write_text("# command: ncu ...\n# commit: abc\n# gpu: NVIDIA H100\nbody\n# exit code: 0\n")
    assert benchmark_script("ncu_source_summary").main([str(path), "--top", "1", "--source-log", str(log)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["# source run command: ncu ...", "# source run commit: abc", "# source run gpu: NVIDIA H100"]
    assert out[3].startswith("# summary command: python3 benchmarks/ncu_source_summary.py") and "--source-log" in out[3]
    assert not any("exit code" in line for line in out)
    assert "the K loop: 4 instructions, 37.0% of samples [barrier 62%]" in "\n".join(out)
