"""Registers and spills of every CUDA kernel, from a build log compiled with ``-Xptxas -v``.

No GPU needed: ptxas reports, per kernel and architecture, the registers a thread uses, its stack
frame and the bytes it spills to local memory. That is the first thing to know about a kernel whose
occupancy its registers cap (the knob item_min_blocks compiles the mean field's splat and slice
for 5 or 6 resident blocks of 256 threads per SM, i.e. at most 48 or 40 registers: do they spill?).

    NVCC_APPEND_FLAGS="-Xptxas -v" bash benchmarks/prebuild_for_device.sh   # keeps .prebuilt/build.log
    python benchmarks/ptxas_table.py .prebuilt/build.log [--match REGEX] [--arch sm_90a]

Prints one row per kernel: the architecture, registers, stack frame, spill stores and loads, and
the kernel's name shortened to rrm_cuda's functor (for_each_item_kernel<F> -> F, the register-capped
for_each_item_kernel_capped<F, k> -> F [min k blocks]). Names are demangled with c++filt when it is
on the PATH (the --match regex sees the demangled name).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")


def parse(text: str) -> list[dict[str, int | str]]:
    """One dict per compiled entry function: name (mangled), arch, regs, stack, spill_stores,
    spill_loads. ptxas prints the entry line, then (in either order) the frame line and the
    registers line; an entry without a registers line is left out."""
    rows: list[dict[str, int | str]] = []
    cur: dict[str, int | str] | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            rows.append(cur)
            cur = None
    return rows


def demangle(names: list[str]) -> list[str]:
    """The names through c++filt (one process for all), or as they are without it."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


def _drop_args(name: str) -> str:
    """The name without its trailing parameter list (which may hold parentheses of its own)."""
    if not name.endswith(")"):
        return name
    depth = 0
    for k in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[k], 0)
        if depth == 0:
            return name[:k]
    return name


def short(name: str) -> str:
    """rrm_cuda's launch kernels by their functor: for_each_item_kernel<F>(...) -> F,
    for_each_item_kernel_capped<F, k>(...) -> 'F [min k blocks]'; namespaces rrm:: dropped."""
    name = _drop_args(name.removeprefix("void ").strip())
    for ns in ("rrm::lattice::", "rrm::energy::", "rrm::bcd::", "rrm::"):
        name = name.replace(ns, "")
    m = re.fullmatch(r"for_each_item_kernel_capped<(.*), (\d+)>", name)
    if m:
        return f"{m.group(1)} [min {m.group(2)} blocks]"
    m = re.fullmatch(r"for_each_(?:item_|counted_|block_)?kernel<(.*)>", name)
    return m.group(1) if m else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="a build log with ptxas -v output")
    ap.add_argument("--match", default="", help="only kernels whose demangled name matches this regex")
    ap.add_argument("--arch", default="", help="only this architecture (e.g. sm_90a)")
    args = ap.parse_args()
    with open(args.log, encoding="utf-8", errors="replace") as fh:
        rows = parse(fh.read())
    if not rows:
        print(f"no ptxas -v output in {args.log} (build with NVCC_APPEND_FLAGS='-Xptxas -v')", file=sys.stderr)
        return 1
    for row, full in zip(rows, demangle([str(r["name"]) for r in rows])):
        row["full"] = full
    pat = re.compile(args.match) if args.match else None
    kept = [r for r in rows if (not pat or pat.search(str(r["full"]))) and (not args.arch or r["arch"] == args.arch)]
    print(f"{'arch':8s} {'regs':>4s} {'stack':>6s} {'spill st':>8s} {'spill ld':>8s}  kernel")
    for r in sorted(kept, key=lambda r: (short(str(r["full"])), str(r["arch"]))):
        print(
            f"{r['arch']!s:8s} {r['regs']:>4d} {r['stack']:>6d} {r['spill_stores']:>8d} {r['spill_loads']:>8d}  "
            f"{short(str(r['full']))}"
        )
    print(f"{len(kept)} of {len(rows)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
