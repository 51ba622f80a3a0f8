"""Sweep of the tiled mean field's settings on the dense CRF of a photograph (NOTES §15): pixels per
tile P (knob mean_field_tile), the public API's square pixel tiles (functional._PIXEL_TILE) and the
block kernel (knob mean_field_tile_kernel), against the untiled mean field timed in the same run.

    python benchmarks/tile_sweep.py                # astronaut 512x512, 21 labels, 10 iterations
    python benchmarks/tile_sweep.py --out-dir DIR  # also writes tile_sweep_<gpu>.json

Each setting: the public rrm_cuda.dense_crf call's median milliseconds (torch.utils.benchmark, lattice
build included; the lattice cache cleared at each switch, then refilled by a warm-up call), and its
result against the untiled one (largest |dQ|, the share of pixels whose label agrees). Settings that
do not fit a block (shared memory) run a lower kernel, as the op does; the table says which ran.
Needs a CUDA device and a CUDA build. Reports only (no speed assertions).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_tag, time_fn  # noqa: E402

import rrm_cuda  # noqa: E402
from rrm_cuda import _C, functional  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="side of the centre crop of the astronaut photograph")
    ap.add_argument("--labels", type=int, default=21, help="labels (default: 21)")
    ap.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    ap.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timing per setting")
    ap.add_argument("--tiles", default="128,256,512,1024", help="pixels per tile P (comma-separated)")
    ap.add_argument("--pixel-tiles", default="0,8,16,32", help="square pixel-tile sides of the public API (0: raster)")
    ap.add_argument("--kernels", default="1,2,3", help="mean_field_tile_kernel values")
    ap.add_argument("--out-dir", default=None, help="also write tile_sweep_<device>.json there")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not rrm_cuda.build_info().get("with_cuda", False):
        raise SystemExit("tile_sweep.py needs a CUDA device and a CUDA build")
    from skimage import data

    dev = torch.device("cuda")
    S, L = args.size, args.labels
    photo = data.astronaut()
    y0, x0 = (photo.shape[0] - S) // 2, (photo.shape[1] - S) // 2
    img = torch.from_numpy(photo[y0 : y0 + S, x0 : x0 + S].copy()).permute(2, 0, 1)[None].contiguous().to(dev)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, L, S, S, generator=g) * 3, 1).to(dev)
    saved, saved_pixel = _C.tuning(), functional._PIXEL_TILE["cuda"]

    def apply(tile: int, kernel: int, pixel: int) -> None:
        _C.set_tuning("mean_field_tile", tile)
        _C.set_tuning("mean_field_tile_kernel", kernel)
        functional._PIXEL_TILE["cuda"] = pixel
        rrm_cuda.clear_lattice_cache()

    def call() -> torch.Tensor:
        return rrm_cuda.dense_crf(probs=probs, image=img, iterations=args.iterations)

    rows = []
    try:
        apply(0, saved["mean_field_tile_kernel"], 0)
        ref = call()
        base = time_fn(call, dev, args.min_run_time)[0]
        rows.append(dict(tile=0, pixel_tile=0, kernel=0, ran=0, ms=base, max_dq=0.0, agree=1.0))
        print(f"untiled (raster): {base:.3f} ms", flush=True)
        settings = itertools.product(
            [int(t) for t in args.tiles.split(",")],
            [int(p) for p in args.pixel_tiles.split(",")],
            [int(k) for k in args.kernels.split(",")],
        )
        for tile, pixel, kernel in settings:
            apply(tile, kernel, pixel)
            before = _C.tiled_mean_field_steps()
            q = call()
            ran = kernel if _C.tiled_mean_field_steps() > before else 0
            ms = time_fn(call, dev, args.min_run_time)[0]
            dq = float((q - ref).abs().max())
            agree = float((q.argmax(1) == ref.argmax(1)).float().mean())
            rows.append(dict(tile=tile, pixel_tile=pixel, kernel=kernel, ran=ran, ms=ms, max_dq=dq, agree=agree))
            print(
                f"P {tile:5d}  pixel tiles {pixel:2d}  kernel {kernel} (ran {'block' if ran else 'chunk splat'})"
                f"  {ms:7.3f} ms  ({100 * (ms / base - 1):+5.1f} %)  max|dQ| {dq:.1e}  labels {100 * agree:.3f} %",
                flush=True,
            )
    finally:
        for name in ("mean_field_tile", "mean_field_tile_kernel"):
            _C.set_tuning(name, saved[name])
        functional._PIXEL_TILE["cuda"] = saved_pixel
        rrm_cuda.clear_lattice_cache()
    best = min(rows, key=lambda r: r["ms"])
    print(f"fastest: {best}")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        name = torch.cuda.get_device_name(dev)
        path = os.path.join(args.out_dir, f"tile_sweep_{device_tag(dev)}.json")
        meta = dict(device=name, torch=torch.__version__, size=S, labels=L, iterations=args.iterations)
        with open(path, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
