"""Benchmark of one RRM training iteration and of the share its pseudo labels, energy loss and BCD
loss take, with the original CPU path and with rrm_cuda's batched ops on the training device.

    python benchmarks/rrm_bench.py                       # batch 4 and 8, crop 321, small backbone
    python benchmarks/rrm_bench.py --device cuda         # on a GPU (model, pseudo labels, losses)
    python benchmarks/rrm_bench.py --device cuda --backbone resnet38   # the papers' network (random init)
    python benchmarks/rrm_bench.py --quick               # CI-sized

One iteration is ``rrm_cuda.rrm.train.train_step`` itself (the training loop's step): forward,
multi-scale CAM, reliable pseudo labels, CE (bg + fg), energy loss, BCD loss, backward and the SGD
step, with the papers' settings (pr2022 preset: CAM scales 1, 0.5, 1.5, 2; CRFs of 10 iterations;
energy weight 1e-7, sigma_rgb 15, sigma_xy 100 at scale 0.5; BCD weight 1; bf16 autocast on CUDA).
Its three RRM-specific parts come from ``StepOps``:

  * original: the authors' code path. Pseudo labels: CAMs copied to numpy, pydensecrf2 (two dense
    CRFs per image, one image after the other; ``rrm_cuda.compat.pydensecrf``'s shim, named as
    such, when pydensecrf2 is not installed), RRM's ``compute_seg_label``
    (``rrm_cuda.rrm.reference_labels``). Energy loss: copied to the CPU, one lattice per image and
    one filter per channel, images over min(batch, torch threads) threads
    (``_common.rloss_baseline_loss``, shared with energy_bench.py), gradient copied back. BCD: the
    authors' loops over images and classes in PyTorch on the training device
    (``rrm_cuda.reference.bcd_loss_reference_loop``).
  * rrm_cuda: ``reliable_label_parts`` (both CRFs of the whole batch in one ``dense_crf`` call),
    ``DenseEnergyLoss`` and ``bcd_loss``, everything on the training device, no numpy.

Besides the whole iteration, each part is timed alone on the inputs of a real step: pseudo labels
(normalised CAMs -> two dense CRFs -> reliable labels), energy loss forward+backward, BCD forward+
backward; and, for reference, the multi-scale CAM (the extra no-grad forwards, the same in both
paths). The printed share is (pseudo labels + energy + BCD) / iteration; the issue's GPU target is
<= 10 %. Outputs are checked first: the two paths' pseudo labels (pixel agreement), energy values
and BCD values. Timing: torch.utils.benchmark (median, IQR), CUDA synchronised; calls slower than
``--slow-s`` are timed ``--slow-repeats`` times one by one. Writes
benchmarks/results/rrm_<device-tag>.json / .png (benchmarks/_common.py helpers).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (first: it makes rrm_cuda importable from a checkout)

# isort: split
from rrm_cuda import reference as R  # noqa: E402
from rrm_cuda.rrm import losses as L  # noqa: E402
from rrm_cuda.rrm.data import build_dataset  # noqa: E402
from rrm_cuda.rrm.pseudo_labels import ReliableLabels, multiscale_cam  # noqa: E402
from rrm_cuda.rrm.reference_labels import compute_seg_label, crf_inference  # noqa: E402
from rrm_cuda.rrm.train import StepOps, build_model, make_config, param_groups, resolve_device, train_step  # noqa: E402

PARTS = ("pseudo labels", "energy fwd+bwd", "BCD fwd+bwd")


# ---- the original path ------------------------------------------------------------------------------


def pydensecrf_backend() -> str:
    """Name of the pydensecrf the original path runs: pydensecrf2, else rrm_cuda's shim (aliased)."""
    try:
        import pydensecrf.densecrf  # noqa: F401

        return "pydensecrf2"
    except ImportError:
        from rrm_cuda.compat import install_pydensecrf_alias

        install_pydensecrf_alias()
        return "rrm_cuda.compat.pydensecrf shim (pydensecrf2 not installed)"


def original_reliable_labels(raw, cams, labels, *, iterations=10):
    """RRM's original pseudo labels: per image, numpy CAMs, pydensecrf, ``compute_seg_label``."""
    crf = functools.partial(crf_inference, t=iterations)
    img = raw.permute(0, 2, 3, 1).cpu().numpy()
    cam, lab = cams.float().cpu().numpy(), labels.cpu().numpy()
    out = np.stack([compute_seg_label(img[b], lab[b], cam[b], crf) for b in range(img.shape[0])])
    label = torch.from_numpy(out).to(cams.device)
    return ReliableLabels(label, label, None, None, None)


def original_ops(pool) -> StepOps:
    def energy(images, probs, rois, seg_label, *, weight, sigma_rgb, sigma_xy, scale_factor):
        return C.rloss_baseline_loss(images, probs, rois, seg_label, weight, sigma_rgb, sigma_xy, scale_factor, pool)

    return StepOps(reliable_labels=original_reliable_labels, energy_loss=energy, bcd_loss=R.bcd_loss_reference_loop)


# ---- timing -----------------------------------------------------------------------------------------


def timed(fn, device, args) -> tuple[float, float, int]:
    """(median ms, IQR ms, runs): blocked_autorange, or single runs for calls slower than slow_s."""
    import time

    import torch.utils.benchmark as tbench

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    run()  # warm-up (allocations, lazy init, cuDNN autotuning)
    t0 = time.perf_counter()
    run()
    once = time.perf_counter() - t0
    timer = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    if once > args.slow_s:
        m = tbench.Measurement.merge([timer.timeit(1) for _ in range(args.slow_repeats)])[0]
    else:
        m = timer.blocked_autorange(min_run_time=max(args.min_run_time, 3 * once))
    return m.median * 1e3, m.iqr * 1e3, len(m.times)


# ---- one setting ------------------------------------------------------------------------------------


def run_setting(batch: int, args, device: torch.device, pool) -> tuple[list[C.Row], dict]:
    cfg = make_config(
        "pr2022",
        backbone=args.backbone,
        batch_size=batch,
        crop=args.crop,
        iterations=10**9,
        warmup_cls_iterations=0,
        cam_scales=tuple(args.cam_scales),
        crf_iterations=args.crf_iterations,
        device=str(device),
        panel_every=0,
        progress=False,
    )
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    amp = cfg.amp and device.type == "cuda"
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None
    data = build_dataset("embedded", "train", cfg.crop, 0, batch, (args.image_size, args.image_size))
    batch_cpu = torch.utils.data.default_collate([data[i] for i in range(batch)])
    workload = f"B{batch} crop{cfg.crop} {args.backbone}"
    print(f"\n== {workload}: device {device}, CAM scales {cfg.cam_scales}, CRF {cfg.crf_iterations} it", flush=True)

    # inputs of the parts, from one real forward on the device
    b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch_cpu.items()}
    crop = (cfg.crop, cfg.crop)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        outp = model(b["image"])
        cams = multiscale_cam(model, b["image"], b["labels"], crop, cfg.cam_scales, cam_scale1=outp.cam)
    seg_up = F.interpolate(outp.seg.float(), crop, mode="bilinear", align_corners=False)
    seg, feats = outp.seg.float(), outp.bcd_features.float()
    paths = {"original": original_ops(pool), "rrm_cuda": StepOps()}

    # correctness of the parts before timing: the two paths agree
    labels = {
        p: ops.reliable_labels(b["raw"], cams, batch_cpu["labels"], iterations=cfg.crf_iterations).label
        for p, ops in paths.items()
    }
    agree = float((labels["original"] == labels["rrm_cuda"]).float().mean())
    label = labels["rrm_cuda"].masked_fill(b["roi"] == 0, L.IGNORE)
    ekw = dict(
        weight=cfg.energy_weight,
        sigma_rgb=cfg.energy_sigma_rgb,
        sigma_xy=cfg.energy_sigma_xy,
        scale_factor=cfg.energy_scale,
    )
    probs = torch.softmax(seg_up, 1)
    energy = {
        p: float(ops.energy_loss(b["raw"].float(), probs, b["roi"], label[:, None].float(), **ekw))
        for p, ops in paths.items()
    }
    bcd = {p: float(ops.bcd_loss(seg, feats)) for p, ops in paths.items()}
    checks = {
        "pseudo-label pixel agreement": agree,
        "energy rel. diff": abs(energy["rrm_cuda"] - energy["original"]) / max(abs(energy["original"]), 1e-30),
        "BCD rel. diff": abs(bcd["rrm_cuda"] - bcd["original"]) / max(abs(bcd["original"]), 1e-30),
        "labelled fraction": float((label != L.IGNORE).float().mean()),
    }
    print("checks:", {k: round(v, 6) for k, v in checks.items()}, flush=True)
    if agree < 0.99 or checks["energy rel. diff"] > 1e-3 or checks["BCD rel. diff"] > 1e-3:
        raise SystemExit(f"the two paths disagree: {checks}")

    rows: list[C.Row] = []
    summary: dict = {"workload": workload, "batch": batch, "crop": cfg.crop, "checks": checks}
    summary.update(energy_values=energy, bcd_values=bcd, paths={})

    def add(part: str, path: str, fn) -> float:
        med, iqr, runs = timed(fn, device, args)
        rows.append(
            C.Row(
                workload=f"{workload} {part}",
                method=path,
                median_ms=med,
                iqr_ms=iqr,
                threads=torch.get_num_threads() if device.type == "cpu" else None,
                device=str(device),
                extra={"runs": runs},
            )
        )
        print(f"  {path:<9} {part:<26} median {med:10.2f} ms  IQR {iqr:8.2f} ms  ({runs} runs)", flush=True)
        return med

    def cam_fn():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            multiscale_cam(model, b["image"], b["labels"], crop, cfg.cam_scales, cam_scale1=outp.cam)

    cam_ms = add("multi-scale CAM", "both", cam_fn)
    with tempfile.TemporaryDirectory() as tmp:
        for path, ops in paths.items():
            if path == "original" and args.skip_original:
                continue

            def step(ops=ops):
                train_step(model, model, batch_cpu, optimizer, scaler, cfg, 0, device, amp, amp_dtype, Path(tmp), ops)

            # as the training step calls it: image-level labels on the host, as the loader gives them
            def pseudo(ops=ops):
                ops.reliable_labels(b["raw"], cams, batch_cpu["labels"], iterations=cfg.crf_iterations)

            def energy_fb(ops=ops):
                s = seg_up.detach().requires_grad_()
                ops.energy_loss(
                    b["raw"].float(), torch.softmax(s, 1), b["roi"], label[:, None].float(), **ekw
                ).sum().backward()

            def bcd_fb(ops=ops):
                f = feats.detach().requires_grad_()
                ops.bcd_loss(seg.detach(), f).backward()

            it_ms = add("iteration", path, step)
            parts = {name: add(name, path, fn) for name, fn in zip(PARTS, (pseudo, energy_fb, bcd_fb))}
            share = sum(parts.values()) / it_ms
            summary["paths"][path] = {"iteration_ms": it_ms, **{f"{k}_ms": v for k, v in parts.items()}, "share": share}
            print(f"  {path:<9} pseudo labels + energy + BCD = {100 * share:.1f} % of the iteration", flush=True)
    summary["multiscale_cam_ms"] = cam_ms
    if "original" in summary["paths"]:
        o, r = summary["paths"]["original"], summary["paths"]["rrm_cuda"]
        summary["speedup_iteration"] = o["iteration_ms"] / r["iteration_ms"]
    return rows, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: batch 2, 48-px crops, CAM scales 1 and 0.5")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 4 8; --quick: 2)")
    ap.add_argument("--crop", type=int, default=None, help="crop side (default 321; --quick: 48)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the generated images (default crop + 32)")
    ap.add_argument("--backbone", default="small", choices=("small", "resnet38"), help="random init either way")
    ap.add_argument("--cam-scales", type=float, nargs="+", default=None, help="default 1 0.5 1.5 2 (--quick: 1 0.5)")
    ap.add_argument("--crf-iterations", type=int, default=10, help="mean-field iterations of the CRFs (default: 10)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    ap.add_argument(
        "--skip-original", action="store_true", help="time rrm_cuda's path only (the two paths are still checked)"
    )
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per blocked_autorange (1; --quick 0.1)")
    ap.add_argument("--slow-s", type=float, default=3.0, help="time calls slower than this one by one (default: 3.0)")
    ap.add_argument("--slow-repeats", type=int, default=3, help="single runs of a slow call (default: 3; --quick: 2)")
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=C.RESULTS, help="where the JSON/PNG go")
    args = ap.parse_args(argv)
    args.batch = args.batch or ([2] if args.quick else [4, 8])
    args.crop = args.crop or (48 if args.quick else 321)
    args.image_size = args.image_size or args.crop + 32
    args.cam_scales = args.cam_scales or ([1.0, 0.5] if args.quick else [1.0, 0.5, 1.5, 2.0])
    args.min_run_time = args.min_run_time or (0.1 if args.quick else 1.0)
    if args.quick:
        args.slow_repeats = min(args.slow_repeats, 2)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    backend = pydensecrf_backend()
    print(f"original path's dense CRF: {backend}; torch threads {torch.get_num_threads()}", flush=True)
    load_start = os.getloadavg()
    # the original's threads across images: min(batch, threads), as rloss's omp parallel for
    n_workers = max(1, min(max(args.batch), torch.get_num_threads()))
    pool = C.rloss_baseline_pool(n_workers)
    try:
        results = [run_setting(bs, args, device, pool) for bs in args.batch]
    finally:
        pool.close()
        pool.join()

    rows = [r for rs, _ in results for r in rs]
    summaries = [s for _, s in results]
    print()
    C.print_table(rows, "original")
    print()
    for s in summaries:
        r = s["paths"]["rrm_cuda"]
        line = f"{s['workload']}: rrm_cuda iteration {r['iteration_ms']:.0f} ms, pseudo labels + energy + BCD "
        line += f"{100 * r['share']:.1f} % of it" + (" (GPU target <= 10 %)" if device.type == "cuda" else "")
        if "original" in s["paths"]:
            o = s["paths"]["original"]
            line += f"; original {o['iteration_ms']:.0f} ms ({s['speedup_iteration']:.2f}x), {100 * o['share']:.1f} %"
        print(line)
    meta = C.metadata(device)
    meta.update(
        benchmark="rrm",
        quick=args.quick,
        original_dense_crf=backend,
        backbone=args.backbone,
        cam_scales=args.cam_scales,
        crf_iterations=args.crf_iterations,
        energy_baseline_threads=n_workers,
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
        settings=summaries,
    )
    tag = C.device_tag(device) + ("-quick" if args.quick else "") + ("" if args.backbone == "small" else "-resnet38")
    title = f"RRM training iteration and its parts, {args.backbone} backbone"
    for path in C.write_results("rrm", tag, meta, rows, "original", args.out_dir, title):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
