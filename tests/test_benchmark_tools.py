"""The benchmark helpers that run without a GPU: ncu_kernels.py's condensing of an ncu report, and
precision_study.py's quick run."""

from __future__ import annotations

import importlib.util
import math
import os

_SPEC = importlib.util.spec_from_file_location(
    "ncu_kernels", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "ncu_kernels.py")
)
ncu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ncu)

# Two kernels of an ncu text report (H100, session 7), trimmed; the second with a time in ms and a
# count with a thousands separator, and a kernel that is not rrm_cuda's.
REPORT = """==PROF== Connected to process 720 (/usr/bin/python3.12)
bilateral (sxy 80, srgb 13): 21740 vertices for 262144 pixels
[720] python3.12@127.0.0.1
  void for_each_item_kernel<EmbedFunctor<float, 5>>(long, long, long, T1) (6144, 1, 1)x(256, 1, 1), Context 1
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    Elapsed Cycles                cycle       60,420
    Memory Throughput                 %        31.93
    DRAM Throughput                   %        15.99
    Duration                         us        38.18
    L1/TEX Cache Throughput           %        22.09
    L2 Cache Throughput               %        36.67
    Compute (SM) Throughput           %        79.80
    Section: Launch Statistics
    Registers Per Thread             register/thread              40
    Section: Memory Workload Analysis
    Memory Throughput                          Gbyte/s       535.10
    L1/TEX Hit Rate                                  %        71.22
    L2 Hit Rate                                      %        92.38
    Section: Occupancy
    Theoretical Occupancy                     %           75
    Achieved Occupancy                        %        67.46
  void at::native::reduce_kernel<512, 1>(T1) (132, 1, 1)x(512, 1, 1), Context 1
    Section: GPU Speed Of Light Throughput
    DRAM Throughput                   %        80.50
    Duration                         ms         1.65
"""


def test_parse_ncu_report():
    rows = ncu.parse_ncu(REPORT)
    assert [r["kernel"] for r in rows] == [
        "EmbedFunctor<float, 5>",
        "at::native::reduce_kernel<512, 1>",
    ]
    embed, fill = rows
    assert embed["us"] == 38.18 and embed["dram%"] == 15.99 and embed["l2%"] == 36.67
    assert embed["l1%"] == 22.09 and embed["sm%"] == 79.80 and embed["regs"] == 40
    assert embed["l1hit"] == 71.22 and embed["l2hit"] == 92.38
    assert embed["theo%"] == 75 and embed["ach%"] == 67.46
    assert math.isclose(fill["us"], 1650.0) and fill["dram%"] == 80.5 and "l2hit" not in fill
    table = ncu.format_table(rows).splitlines()
    assert table[0].split() == ["kernel", "us", "dram%", "l2%", "l1%", "sm%", "l1hit", "l2hit", "theo%", "ach%", "regs"]
    assert table[1].split()[-3:] == ["75.0", "67.5", "40.0"] and table[2].split()[-1] == "nan"


def test_parse_ncu_ignores_text_before_the_first_kernel():
    assert ncu.parse_ncu("==PROF== Connected\n    Duration   us   3.0\n") == []


def test_precision_study_quick(tmp_path):
    # benchmarks/precision_study.py --quick: the float32 reference mean field meets the parity
    # contract against pydensecrf2 (so the study's comparison is sound), and the 16-bit variants are
    # measured against it; the JSON and the chart are written.
    import json
    import subprocess
    import sys

    import pytest

    pytest.importorskip("pydensecrf.densecrf")
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "precision_study.py")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, script, "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    data = json.loads((tmp_path / "precision_quick.json").read_text())
    assert (tmp_path / "precision_quick.png").stat().st_size > 0
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"float32", "Q fp16", "Q + lattice fp16", "Q bf16", "Q + lattice bf16"}
    assert rows["float32"]["meets_parity"] and rows["float32"]["max_dq_vs_float32"] == 0
    for v in ("Q fp16", "Q bf16", "Q + lattice bf16"):
        assert rows[v]["max_dq_vs_float32"] > 0
    # bf16 rows are coarser than fp16 rows
    assert rows["Q + lattice bf16"]["max_dq_vs_float32"] > rows["Q + lattice fp16"]["max_dq_vs_float32"]
    assert "the parity contract" in out
