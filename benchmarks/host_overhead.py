"""Host-side overhead of the dense CRF and of RRM's pseudo labels: ATen ops dispatched, host reads
(synchronisations on a GPU) and memory queries per call, counted on the CPU, plus the host time of
tiny calls (where launching the ops, not computing them, is the cost).

    python benchmarks/host_overhead.py            # counts (a) and (b), tiny-input host times
    python benchmarks/host_overhead.py --ops      # also every op with its count

(a) ``dense_crf(probs=..., image=...)`` at 512x512, 21 labels; (b) ``reliable_label_parts`` at
B=4, 321x321, 1-2 present classes per image, checked with labels on the device, and (b') as the
training step calls it (labels on the host, ``check_inputs=False``). (b) runs the GPU
formulation of ``_cam_sure`` and of the channel argmax (``vectorised=True``, ``argmax``), as on
a GPU: the CPU fallbacks are loops that a GPU never runs. For each, the ATen calls the C++ op
makes itself on its CUDA code path are counted too (the emulated launch, which runs the same
host code; torch profiler).

A *host read* is a read of a value of a (would-be) device tensor on the host: ``.item()``,
``bool()``/``float()``/``int()`` (``aten::_local_scalar_dense``), ``.tolist()``, ``.cpu()``,
``.numpy()``, and ops whose output size depends on the values (``nonzero``, ``masked_select``,
``unique``). On a GPU each one waits for the queue to drain. Tensors made on the host (factory ops
without a device, ``.cpu()`` results and what is computed from them only) are tracked and not
counted. ``memory`` counts free-memory queries (``rrm_cuda._validate.memory_limit``: on the CPU a
cached read per checked buffer; on a GPU ``torch.cuda.mem_get_info``, which since session 26 only work
above 1/16 of the device's memory makes, so none at these sizes). The custom op
``rrm_cuda::dense_crf`` is counted as one op.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.energy_bench
import rrm_cuda  # noqa: E402
import rrm_cuda._validate as V  # noqa: E402
import rrm_cuda.functional as FN  # noqa: E402
from rrm_cuda.rrm import pseudo_labels as PL  # noqa: E402

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim"}
_HOST = "_rrm_host"
# ops that make no new data (views, aliases, host tensors from Python data): no kernel on a GPU
_VIEWS = {
    "view",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "expand",
    "detach",
    "alias",
    "as_strided",
    "permute",
    "t",
    "transpose",
    "unbind",
    "split",
    "_reshape_alias",
    "lift_fresh",
}


def _is_host(t: object) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _mark(t: object) -> None:
    if isinstance(t, torch.Tensor):
        try:
            setattr(t, _HOST, True)
        except (AttributeError, RuntimeError):  # pragma: no cover
            pass


def _site() -> str:
    """The innermost rrm_cuda frame of the current stack (file:line function)."""
    root = os.path.dirname(os.path.dirname(rrm_cuda.__file__))
    for fr in reversed(traceback.extract_stack()[:-2]):
        if "rrm_cuda" in fr.filename and "host_overhead" not in fr.filename:
            return f"{os.path.relpath(fr.filename, root)}:{fr.lineno} {fr.name}"
    return "?"


class Counter(TorchDispatchMode):
    """Counts ATen ops and host reads of device tensors; tracks which tensors live on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: list[str] = []
        self.memory = 0
        # ops launched after each host read until the CRF op (or the end): on a GPU the queue is
        # empty there, so each of them leaves the GPU idle while the host launches it
        self.stretches: list[int] = []
        self._since: int | None = None

    def sync(self, what: str) -> None:
        self.syncs.append(what)
        self.end_stretch()
        self._since = 0

    def end_stretch(self) -> None:
        if self._since is not None:
            self.stretches.append(self._since)
        self._since = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        ns = func._schema.name.split("::")[0]
        self.ops[f"{ns}::{name}" if ns != "aten" else name] += 1
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        host = all(_is_host(t) for t in tensors) if tensors else kwargs.get("device") is None
        if ns == "rrm_cuda":
            self.end_stretch()
        elif self._since is not None and name not in _VIEWS:
            self._since += 1
        if name in _SYNC_OPS and not host:
            self.sync(f"aten::{name} at {_site()}")
        out = func(*args, **kwargs)
        if host:
            for t in tree_flatten(out)[0]:
                _mark(t)
        return out


def _patched(counter: Counter):
    """Patches the Python-level host reads and the memory query; returns an undo function."""
    saved = {}

    def wrap(meth: str, mark_result: bool):
        orig = getattr(torch.Tensor, meth)
        saved[meth] = orig

        def f(self, *a, **k):
            if not _is_host(self):
                counter.sync(f"Tensor.{meth} at {_site()}")
            with torch.utils._python_dispatch._disable_current_modes():
                r = orig(self, *a, **k)
            if mark_result:
                _mark(r)
            return r

        setattr(torch.Tensor, meth, f)

    wrap("tolist", False)
    wrap("numpy", False)
    wrap("cpu", True)
    orig_memory = V.memory
    orig_limit = getattr(V, "memory_limit", None)

    def memory(*a, **k):
        if orig_limit is None:  # a query per call
            counter.memory += 1
        return orig_memory(*a, **k)

    def memory_limit(*a, **k):
        counter.memory += 1
        return orig_limit(*a, **k)

    V.memory = memory
    if orig_limit is not None:
        V.memory_limit = memory_limit

    def undo():
        for meth, orig in saved.items():
            setattr(torch.Tensor, meth, orig)
        V.memory = orig_memory
        if orig_limit is not None:
            V.memory_limit = orig_limit

    return undo


def _gpu_paths():
    """RRM's GPU formulations on the CPU: the batched _cam_sure and ATen's argmax."""
    cam_sure, argmax = PL._cam_sure, PL._channel_argmax

    def cam_sure_vec(*a, **k):
        k["vectorised"] = True
        return cam_sure(*a, **k)

    PL._cam_sure = cam_sure_vec
    PL._channel_argmax = lambda x: x.argmax(1)

    def undo():
        PL._cam_sure, PL._channel_argmax = cam_sure, argmax

    return undo


def count(fn) -> Counter:
    """Counts of the second call of fn (the steady state of a training loop: constants cached)."""
    fn()
    c = Counter()
    undo = _patched(c)
    try:
        with c:
            fn()
        c.end_stretch()
    finally:
        undo()
    return c


def inputs_a(S: int = 512, L: int = 21, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(1, L, S, S, generator=g), 1)
    image = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8, generator=g)
    return probs, image


def inputs_b(B: int = 4, S: int = 321, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g).float()
    labels = torch.zeros(B, 20)
    for b in range(B):
        for c in torch.randperm(20, generator=g)[: 1 + b % 2].tolist():
            labels[b, c] = 1
    cams = torch.rand(B, 20, S, S, generator=g) * labels[:, :, None, None]
    cams = cams / (cams.flatten(2).amax(2)[:, :, None, None] + 1e-5)
    return image, cams, labels


def report(title: str, c: Counter, show_ops: bool) -> None:
    n = sum(c.ops.values())
    compute = sum(k for op, k in c.ops.items() if op not in _VIEWS)
    print(
        f"{title}: {n} ATen ops ({len(c.ops)} kinds; {compute} not views), {len(c.syncs)} host reads, "
        f"{c.memory} memory queries; ops (not views) from each host read to the CRF op: {c.stretches}"
    )
    for s, k in collections.Counter(c.syncs).items():
        print(f"    sync x{k}: {s}")
    if show_ops:
        for op, k in c.ops.most_common():
            print(f"    {k:4d}  {op}")


def host_time(fn, reps: int = 50, rounds: int = 5) -> float:
    """Wall time of fn in microseconds: the smallest of ``rounds`` medians of ``reps`` calls (after
    warm-up; the smallest median resists other processes on a shared machine)."""
    for _ in range(10):
        fn()
    medians = []
    for _ in range(rounds):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        medians.append(statistics.median(ts))
    return min(medians) * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", action="store_true", help="list every op with its count")
    ap.add_argument("--no-time", action="store_true", help="counts only")
    ap.add_argument("--no-count", action="store_true", help="tiny-input host times only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not args.no_count:
        counts(args.ops)
    if not args.no_time:
        times()


def op_args(fn) -> tuple:
    """The arguments fn passes to ``torch.ops.rrm_cuda.dense_crf`` (its last call)."""
    F = sys.modules["rrm_cuda.functional"]
    real, seen = F.ops, []

    class _Spy:
        def __getattr__(self, name):
            op = getattr(real, name)
            if name != "dense_crf":
                return op
            return lambda *a: (seen.append(a), op(*a))[1]

    F.ops = _Spy()
    try:
        fn()
    finally:
        F.ops = real
    return seen[-1]


_INNER_VIEWS = _VIEWS | {"narrow", "diagonal", "reshape"}


def inner_ops(args: tuple, show_ops: bool) -> str:
    """ATen calls made by the C++ op itself on its CUDA code path (the emulated launch runs the
    same host code on the CPU): the profiler's direct children of the op, second call (cached
    lattices warm), functor launches not included."""
    from torch.profiler import ProfilerActivity, profile

    op = torch.ops.rrm_cuda._dense_crf_emulated
    op(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op(*args)
    root = next(e for e in prof.events() if e.name == "rrm_cuda::_dense_crf_emulated")
    kids = collections.Counter(ch.name.split("::")[-1] for ch in root.cpu_children)
    n = sum(kids.values())
    compute = sum(k for name, k in kids.items() if name not in _INNER_VIEWS)
    lines = [f"inside the op (CUDA path, emulated): {n} ATen calls ({compute} not views)"]
    if show_ops:
        lines += [f"    {k:4d}  {name}" for name, k in kids.most_common()]
    return "\n    ".join(lines)


def counts(show_ops: bool) -> None:
    probs, image = inputs_a()
    fa = lambda: rrm_cuda.dense_crf(probs=probs, image=image)  # noqa: E731
    report("(a) dense_crf 512x512x21", count(fa), show_ops)
    print("    " + inner_ops(op_args(fa), show_ops))
    im, cams, labels = inputs_b()
    undo = _gpu_paths()
    try:
        # checked, labels on the device (the default of a direct call)
        c = count(lambda: PL.reliable_label_parts(im, cams, labels))
        report("(b) reliable_label_parts B4 321x321, checked, labels on the device", c, show_ops)
        # as the training step calls it: labels on the host (as the loader gives them), unchecked
        _mark(labels)
        fb = lambda: PL.reliable_label_parts(im, cams, labels, check_inputs=False)  # noqa: E731
        c = count(fb)
        args_b = op_args(fb)
    finally:
        undo()
    report("(b') the same as the training step calls it: host labels, check_inputs=False", c, show_ops)
    print("    " + inner_ops(args_b, show_ops))
    # (c) the energy loss fwd+bwd as RRM calls it (the drop-in module at scale 0.5), checked (with the
    # GPU's one-pass statistics op) and unchecked; and the same through F.interpolate (the path of
    # other scales, and of every scale before ops.dense_energy_inputs)
    from benchmarks.energy_bench import make_inputs
    from rrm_cuda import energy as E

    images, probs, rois, labels = make_inputs(8, 21, 321)
    p = probs.detach().requires_grad_()
    saved = dict(E._FUSED_STRIDES)
    E._STATS_OP_ON_CPU = True  # the GPU formulation of the value checks (one op)
    tile_saved = FN._PIXEL_TILE["cpu"]
    FN._PIXEL_TILE["cpu"] = FN._PIXEL_TILE["cuda"]  # and the GPU's pixel order
    for checked in (True, False):
        m = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, check_inputs=checked)
        fc = lambda: torch.autograd.grad(m(images, p, rois, labels).sum(), p)  # noqa: E731
        report(f"(c) DenseEnergyLoss 8x21x321^2 fwd+bwd, check_inputs={checked}", count(fc), show_ops)
        E._FUSED_STRIDES.clear()
        try:
            report("    the same through F.interpolate", count(fc), show_ops)
        finally:
            E._FUSED_STRIDES.update(saved)
    E._STATS_OP_ON_CPU = False
    FN._PIXEL_TILE["cpu"] = tile_saved


def times() -> None:
    tp, ti = inputs_a(8, 21)
    bi, bc, bl = inputs_b(4, 8)
    ta = host_time(lambda: rrm_cuda.dense_crf(probs=tp, image=ti, iterations=1))
    undo = _gpu_paths()
    try:
        tb = host_time(lambda: PL.reliable_label_parts(bi, bc, bl, iterations=1))
    finally:
        undo()
    # the C++ op alone on the same problems (its lattices and one iteration): the rest is host overhead
    ops = torch.ops.rrm_cuda
    u = -torch.log(tp.clamp(1e-5, 1)).flatten(2)
    pos = rrm_cuda.position_features(1, (8, 8), 3.0)
    bil = rrm_cuda.bilateral_features(ti, 80.0, 13.0)
    pots = torch.stack([-3.0 * torch.eye(21), -10.0 * torch.eye(21)])
    oa = host_time(lambda: ops.dense_crf(u, [pos, bil], pots, [True, True], [0, 0], 1))
    u3 = torch.rand(8, 3, 64)
    pots3 = pots[:, :3, :3].contiguous()
    bil4 = rrm_cuda.bilateral_features(bi, 80.0, 13.0)
    ob = host_time(lambda: ops.dense_crf(u3, [pos, bil4], pots3, [True, True], [0, 0], 1))
    # host only: the CRF op replaced by a softmax of the unary (a few microseconds)
    F = sys.modules["rrm_cuda.functional"]

    real = F.ops

    class _Stub:  # the other ops (the features' ops) are the real ones
        @staticmethod
        def dense_crf(u, *args):
            return torch.softmax(-u, 1)

        def __getattr__(self, name):
            return getattr(real, name)

    F.ops = _Stub()
    undo = _gpu_paths()
    try:
        ha = host_time(lambda: rrm_cuda.dense_crf(probs=tp, image=ti, iterations=1))
        hb = host_time(lambda: PL.reliable_label_parts(bi, bc, bl, iterations=1))
    finally:
        F.ops = real
        undo()
    print(
        f"tiny, 1 thread, 1 iteration: (a) dense_crf 8x8x21 {ta:.0f} us (the op alone {oa:.0f} us; "
        f"without the op {ha:.0f} us); (b) reliable_label_parts B4 8x8 {tb:.0f} us (its CRF op alone "
        f"{ob:.0f} us; without the op {hb:.0f} us, CPU argmax ~2 x 100 us included)"
    )


if __name__ == "__main__":
    sys.exit(main())
