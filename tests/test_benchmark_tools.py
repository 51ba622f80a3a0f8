"""The benchmark helpers that run without a GPU: ncu_kernels.py's condensing of an ncu report,
precision_study.py's and lattice_stats.py's quick runs, cuda_host.py's host timeline (dry run on the
CPU), and gpu_check.sh's packing, time budget and background A/B build (with a stand-in python)."""

from __future__ import annotations

import importlib.util
import math
import os


def _load(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ncu = _load("ncu_kernels")

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


ptxas = _load("ptxas_table")

# nvcc 13's ptxas -v lines for two kernels (sm_90a, session 30's prebuild), one with spills, and a
# line that belongs to no entry
PTXAS_LOG = """ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_ZN3rrm27for_each_item_kernel_cappedINS_7lattice17SplatChunkFunctorIfLi4ELb0ELb0EEELi6EEEvlllT_' for 'sm_90a'
ptxas info    : Function properties for _ZN3rrm27for_each_item_kernel_cappedINS_7lattice17SplatChunkFunctorIfLi4ELb0ELb0EEELi6EEEvlllT_
    24 bytes stack frame, 44 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 24 bytes cumulative stack size
ptxas info    : Compile time = 18.873 ms
ptxas info    : Compiling entry function '_ZN3rrm15for_each_kernelINS_3bcd15GradSumsFunctorIfEEEEvlT_' for 'sm_80'
ptxas info    : Function properties for _ZN3rrm15for_each_kernelINS_3bcd15GradSumsFunctorIfEEEEvlT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers, 384 bytes cmem[0]
"""  # noqa: E501


def test_ptxas_table_parses_registers_and_spills():
    rows = ptxas.parse(PTXAS_LOG)
    assert [(r["arch"], r["regs"], r["stack"], r["spill_stores"], r["spill_loads"]) for r in rows] == [
        ("sm_90a", 40, 24, 44, 52),
        ("sm_80", 26, 0, 0, 0),
    ]
    assert rows[0]["name"].startswith("_ZN3rrm27for_each_item_kernel_capped")
    # demangled names shortened to the functor; a parameter list with parentheses of its own
    assert (
        ptxas.short(
            "void rrm::for_each_item_kernel_capped<rrm::lattice::SplatChunkFunctor<float, 4, false, false>, 6>"
            "(long, long, long, rrm::lattice::SplatChunkFunctor<float, 4, false, false>)"
        )
        == "SplatChunkFunctor<float, 4, false, false> [min 6 blocks]"
    )
    assert (
        ptxas.short(
            "void rrm::for_each_kernel<rrm::energy::(anonymous namespace)::F<float>>(long, "
            "rrm::energy::(anonymous namespace)::F<float>)"
        )
        == "(anonymous namespace)::F<float>"
    )
    assert ptxas.short("at::native::reduce_kernel<512, 1>(int)") == "at::native::reduce_kernel<512, 1>"
    assert ptxas.parse("no ptxas here\n") == []


def test_energy_bench_marginal_time():
    # "behind GPU work" rows: the work-and-loss median less the work's, the IQRs added (a bound)
    energy = _load("energy_bench")
    got = energy.marginal({"median_ms": 5.6, "iqr_ms": 0.02, "runs": 9}, {"median_ms": 5.0, "iqr_ms": 0.01, "runs": 12})
    assert math.isclose(got["median_ms"], 0.6) and math.isclose(got["iqr_ms"], 0.03) and got["runs"] == 9


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


def _gpu_check(tmp_path, steps, budget, sleeps, timeout, extra_env=None):
    """benchmarks/gpu_check.sh STEPS under a stand-in $OUT with a stand-in python, which writes a JSON
    into --out-dir and sleeps ``sleeps[script]`` seconds; killed (its process group) after
    ``timeout`` s. -> (return code or None when killed, the files in $OUT, the log)."""
    import signal
    import subprocess

    stub = tmp_path / "py"
    cases = "".join(f"*{k}.py) sleep {v} ;; " for k, v in sleeps.items())
    stub.write_text(
        "#!/bin/sh\n"
        f'case "$1" in {cases}esac\n'
        'name=$(basename "$1" .py)\n'
        'while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && mkdir -p "$2" && echo "{}" > "$2/$name.json"; shift; done\n'
    )
    stub.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), BUDGET=str(budget), PY=str(stub), TMPDIR=str(tmp_path), **(extra_env or {}))
    env.pop("OUT_DIR", None)
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    proc = subprocess.Popen(
        ["bash", "benchmarks/gpu_check.sh", *steps],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # a call stopped at its limit: everything of it killed
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    return rc, {p.name: p for p in out.iterdir()}, (out / "logs.txt").read_text()


def test_gpu_check_keeps_within_its_budget(tmp_path):
    # BUDGET: the steps that no longer fit are skipped (and count as failures); the results so far
    # come back as one file beside the log
    import tarfile

    rc, files, log = _gpu_check(tmp_path, ["profile", "host", "tiles"], 33, {"cuda_profile": 4}, 60)
    assert "=== cuda_profile: rc=0" in log, log
    assert "=== cuda_host: skipped (BUDGET=33s" in log and "=== tile_sweep: skipped" in log, log
    assert rc == 1 and sorted(files) == ["logs.txt", "results.tgz"]
    with tarfile.open(files["results.tgz"]) as tar:
        assert "results/cuda_profile.json" in tar.getnames()
    assert not list(tmp_path.glob("rrm-gpu-results.*"))  # its work folder removed on exit
    # a budget that is not a whole number of seconds is refused before anything runs
    import subprocess

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "profile"],
        cwd=root,
        env=dict(os.environ, OUT_DIR=str(tmp_path / "o2"), BUDGET="9.5"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "BUDGET must be a whole number of seconds; got '9.5'" in proc.stderr


def test_gpu_check_packs_results_after_every_step(tmp_path):
    # a run killed in its third step (as the device tool stops a call at its limit) has packed the
    # first two steps' results
    import tarfile

    rc, files, log = _gpu_check(tmp_path, ["profile", "host", "tiles"], 0, {"tile_sweep": 60}, 8)
    assert rc is None and "=== cuda_host: rc=0" in log, log
    with tarfile.open(files["results.tgz"]) as tar:
        assert {"results/cuda_profile.json", "results/cuda_host.json"} <= set(tar.getnames())


def test_gpu_check_builds_the_ab_baseline_beside_the_build(tmp_path):
    # the ab step's baseline (a tarball of sources) builds in the background during the build step,
    # so the ab step finds it built; then cuda_host and energy_bench run in both trees
    import tarfile

    src = tmp_path / "src"
    (src / "benchmarks").mkdir(parents=True)
    (src / "setup.py").write_text("")
    with tarfile.open(tmp_path / "base.tgz", "w:gz") as tar:
        tar.add(src, arcname=".")
    env = {"AB_SRC": str(tmp_path / "base.tgz"), "AB_ROUNDS": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}
    rc, files, log = _gpu_check(tmp_path, ["build", "ab"], 0, {"setup": 3}, 60, env)
    assert rc == 0, log
    assert "=== ab_build: started in the background" in log and "=== build: rc=0 in 3s" in log, log
    waited = int(log.split("=== ab_build: rc=0 in ")[1].split("s")[0])
    assert waited <= 1, log  # built while the main build ran, not after it
    for tag in ("base_1", "head_1"):
        assert f"=== ab cuda_host {tag}: rc=0" in log and f"=== ab energy_bench {tag}: rc=0" in log, log
    assert "ab_build.txt" in files
    with tarfile.open(files["results.tgz"]) as tar:
        assert {"results/ab_base_1/cuda_host.json", "results/ab_head_1/energy_bench.json"} <= set(tar.getnames())


def test_gpu_check_takes_a_matching_prebuilt_extension(tmp_path):
    # benchmarks/prebuild_for_device.sh's .prebuilt/ in a small tree: taken when its stamp matches
    # the sources, torch, Python and the GPU; built from source after a change to csrc/, and when the
    # prebuilt copy does not import (a stand-in python answers the script's queries)
    import shutil
    import subprocess

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    for name in ("gpu_check.sh", "source_hash.sh"):
        shutil.copy(os.path.join(root, "benchmarks", name), tree / "benchmarks" / name)
    (tree / "csrc").mkdir()
    (tree / "csrc" / "op.cpp").write_text("int x;\n")
    (tree / "setup.py").write_text("")
    (tree / "rrm_cuda").mkdir()
    (tree / ".prebuilt").mkdir()
    so = "_C.cpython-312-x86_64-linux-gnu.so"
    (tree / ".prebuilt" / so).write_text("prebuilt")
    source = subprocess.run(
        ["bash", "benchmarks/source_hash.sh"], cwd=tree, capture_output=True, text=True, check=True
    ).stdout.strip()
    (tree / ".prebuilt" / "stamp").write_text(f"source {source}\ntorch 2.11.0+cu130\npython 3.12\narch 9.0a\n")
    stub = tmp_path / "py"
    stub.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        "  *get_device_capability*) echo 9.0 ;;\n"
        "  *torch.__version__*) echo 2.11.0+cu130 ;;\n"
        "  *sys.version_info*) echo 3.12 ;;\n"
        '  *"import rrm_cuda"*) [ -f FAIL_IMPORT ] && exit 1; echo with_cuda ;;\n'
        "  *setup.py*) echo source > rrm_cuda/built ;;\n"
        "esac\n"
    )
    stub.chmod(0o755)

    def build(out):
        env = dict(os.environ, OUT_DIR=str(tmp_path / out), PY=str(stub), TMPDIR=str(tmp_path))
        env.pop("TORCH_CUDA_ARCH_LIST", None)
        subprocess.run(["bash", "benchmarks/gpu_check.sh", "build"], cwd=tree, env=env, capture_output=True, timeout=60)
        return (tmp_path / out / "logs.txt").read_text()

    log = build("o1")
    assert "=== build: prebuilt extension taken" in log and "=== build (limit" not in log, log
    assert (tree / "rrm_cuda" / so).read_text() == "prebuilt" and not (tree / "rrm_cuda" / "built").exists()
    (tree / "rrm_cuda" / so).unlink()
    (tree / "csrc" / "op.cpp").write_text("int y;\n")  # a change to the sources: built anew
    log = build("o2")
    assert "=== prebuilt: not taken" in log and f"source {source}" in log and "=== build: rc=0" in log, log
    assert (tree / "rrm_cuda" / "built").exists() and not (tree / "rrm_cuda" / so).exists()
    (tree / "csrc" / "op.cpp").write_text("int x;\n")
    (tree / "rrm_cuda" / "built").unlink()
    (tree / "FAIL_IMPORT").write_text("")
    log = build("o3")
    assert "=== prebuilt: does not import here" in log and "=== build: rc=0" in log, log
    assert (tree / "rrm_cuda" / "built").exists() and not (tree / "rrm_cuda" / so).exists()


def test_cuda_host_timeline_dry_run_on_the_cpu():
    # cuda_host.py's per-op host timeline, on the CPU (no launches or waits there): the calling
    # thread's top-level ops in order, with the ops nested in each counted
    import torch

    host = _load("cuda_host")
    x = torch.randn(64, 64)

    def fn():
        y = torch.mm(x, x)
        torch.nn.functional.softmax(y, 1).sum()

    rows = host.timeline(fn, cuda=False)
    names = [r["op"] for r in rows]
    assert names[:2] == ["aten::mm", "aten::softmax"] and "aten::sum" in names, names
    soft = rows[1]
    assert soft["aten ops"] >= 2 and soft["launches"] == 0 and soft["waits"] == []  # softmax > _softmax
    assert all(r["host us"] >= 0 and r["gap before us"] >= 0 for r in rows)
    assert [r["start us"] for r in rows] == sorted(r["start us"] for r in rows)


def test_cuda_host_timeline_places_runtime_calls_by_time():
    # On a GPU the profiler's launches and waits may carry another thread id than the ops and no
    # parent: they go to the top-level op that encloses them in time, a wait with its op chain, and
    # a call outside every op gets a row of its own (made-up events, as the profiler gives them).
    from types import SimpleNamespace as E

    host = _load("cuda_host")

    def ev(name, t0, t1, thread=1, parent=None):
        e = E(name=name, thread=thread, time_range=E(start=t0, end=t1, elapsed_us=lambda: t1 - t0))
        e.cpu_parent, e.cpu_children = parent, []
        if parent is not None:
            parent.cpu_children.append(e)
        return e

    op = ev("rrm_cuda::dense_energy", 10.0, 100.0)
    item = ev("aten::item", 40.0, 80.0, parent=op)
    dense = ev("aten::_local_scalar_dense", 41.0, 79.0, parent=item)
    other = ev("aten::sum", 120.0, 130.0)
    events = [
        op,
        item,
        dense,
        other,
        ev("cudaLaunchKernel", 12.0, 15.0, thread=99),
        ev("cudaLaunchKernel", 20.0, 23.0, thread=99),
        ev("cudaMemcpyAsync", 42.0, 78.0, thread=99),
        ev("cudaLaunchKernel", 121.0, 124.0, thread=99),
        ev("cudaStreamSynchronize", 140.0, 150.0, thread=99),
    ]
    rows = host.timeline_rows(events, one_thread=False)
    assert [r["op"] for r in rows] == ["rrm_cuda::dense_energy", "aten::sum", "(cudaStreamSynchronize outside the ops)"]
    first, second, outside = rows
    assert first["launches"] == 2 and first["aten ops"] == 2 and first["host us"] == 90.0
    assert first["waits"] == [
        ("rrm_cuda::dense_energy > aten::item > aten::_local_scalar_dense > cudaMemcpyAsync", 36.0)
    ]
    assert second["launches"] == 1 and second["gap before us"] == 20.0 and second["waits"] == []
    assert outside["waits"] == [("cudaStreamSynchronize", 10.0)] and outside["start us"] == 130.0


def test_lattice_stats_quick(tmp_path):
    # benchmarks/lattice_stats.py --quick: the reference lattice's points are the C++ op's (its
    # vertex counts are checked inside), the hash simulation places every key, and the JSON and the
    # chart are written.
    import json

    stats = _load("lattice_stats")
    results = stats.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "lattice_stats_quick.json").read_text())
    assert (tmp_path / "lattice_stats_quick.png").stat().st_size > 0
    assert [r["lattice"] for r in data["results"]] == [r["lattice"] for r in results] and len(results) == 3
    for r in data["results"]:
        for s in r["images"]:
            assert s["E"] == s["N"] * (s["d"] + 1) and 0 < s["M"] <= s["E"]
            assert s["entries_per_vertex_mean"] == s["E"] / s["M"]
            assert 1 <= s["probes_per_entry_mean"] <= s["probes_max"] <= s["first_table_slots"]
            assert 1 <= s["distinct_keys_per_warp_corner_major"] <= 32
            assert s["claims_on_busiest_counter"] * s["claim_counters"] >= min(s["M"], s["first_table_slots"])
        rs = r["row_scan"]
        assert rs["counted_row"] == r["images"][0]["E"] + 1
        assert (rs["counted_rounds"] > 0) == (r["B"] > 1)

    # the numpy hash against lattice_common.h's hash_key written out in Python integers (uint32
    # wrap-around, negative coordinates as their two's complement)
    def hash_key(key):
        h = 0
        for k in key:
            h = ((h + (k & 0xFFFFFFFF)) * 2531011) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        return h ^ (h >> 13)

    keys = [[0, 0], [1, 0], [-3, 3], [5, -12, 7, 0, -1], [2**30, -(2**30), 6, -6, 1]]
    for key in keys:
        assert int(stats.hash_keys(stats.np.array([key], dtype=stats.np.int64))[0]) == hash_key(key), key
