"""benchmarks/ncu_details_table.py on text shaped as ncu's details page with a benchmark's lines around it: one
row per kernel, labelled in order, and a refusal to label where the counts do not pair up."""

LOG = """deepseek-v3 shard 32 T=8192 fp8_block gate_up block_n=256 group_m=8 walk=fixed: 3.228 ms 1192 TFLOP/s
deepseek-v3 shard 32 T=8192 fp8_block gate_up block_n=256 group_m=8 walk=fixed diagnostic=no_loads: 2.9 ms 1300 TFLOP/s
==PROF== Disconnected from process 744
  ws_grouped_gemm_kernel (132, 1, 1)x(384, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    SM Frequency                    Ghz         1.50
    Elapsed Cycles                cycle    4,875,134
    Memory Throughput                 %        80.13
    DRAM Throughput                   %        56.23
    Duration                         ms         3.21
    L2 Cache Throughput               %        79.61
    Compute (SM) Throughput           %        76.41
    Section: Memory Workload Analysis
    Memory Throughput                          Tbyte/s         1.89
    L2 Hit Rate                                      %        64.06
    Section: Warp State Statistics
    Warp Cycles Per Issued Instruction             cycle         7.65
  void other<1, 2>(float *, int) (66, 1, 1)x(384, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    SM Frequency                    Mhz     1,600.00
    Elapsed Cycles                cycle    4,000,000
    Duration                         us       2500.00
    Compute (SM) Throughput           %        90.00
    Section: Memory Workload Analysis
    Memory Throughput                          Gbyte/s       900.00
"""


def test_rows_in_order_with_their_labels(tmp_path, capsys, benchmark_script):
    path = tmp_path / "ncu.log"
    path.write_text(LOG)
    assert benchmark_script("ncu_details_table").main([str(path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| deepseek")]
    assert len(rows) == 2
    first, second = rows
    assert "walk=fixed | 4,875,134 | 1.5 | 3.21 | 76.4 | 79.6 | 56.2 | 64.1 | 7.65 | 6.07 |" in first
    # the second kernel's units as ncu scaled them (MHz, us, Gbyte/s) brought to the columns', what it lacks left out
    assert "diagnostic=no_loads | 4,000,000 | 1.6 | 2.5 | 90 | - | - | - | - | 2.25 |" in second


def test_labels_from_alternatives_each_with_its_group(tmp_path, capsys, benchmark_script):
    path = tmp_path / "ncu.log"
    path.write_text("profiled deepgemm fp8 ds32: rel err 1e-3\n" + LOG.split("\n", 1)[1])
    labels = r"^(?:profiled (deepgemm .*?): |(.+?group_m=.*?): [\d.]+ ms)"
    assert benchmark_script("ncu_details_table").main([str(path), "--labels", labels]) == 0
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["| deepgemm fp8 ds32", "| deepseek-v3 shard 32 T=8192 fp8_block gate_up block_n=256 group_m=8 "
                    "walk=fixed diagnostic=no_loads"]


def test_counts_that_do_not_pair_up_leave_the_rows_unlabelled(tmp_path, capsys, benchmark_script):
    path = tmp_path / "ncu.log"
    path.write_text(LOG.split("\n", 1)[1])                  # one label for two kernels
    assert benchmark_script("ncu_details_table").main([str(path)]) == 1
    captured = capsys.readouterr()
    assert "| ws_grouped_gemm_kernel #0 |" in captured.out and "| void other<1, 2>(float *, int) #1 |" in captured.out
    assert "2 kernels but 1 labels" in captured.err
