"""Which U-Net levels gain from channels_last? The guided fp16 step replayed from a CUDA graph with the modules of
some resolutions channels_last and the rest NCHW (docs/performance.md#channels_last-and-groupnorm;
minisd.fast.graphs makes all of them NHWC).

    python bench/layout.py --out out/bench/layout.json
    python bench/layout.py --smoke --out /tmp/l.json      # the test suite's CPU smoke test: tiny U-Net, eager step

A module is put at the resolution of its input (input_blocks.3, the first downsampler, counts as 64x64); each
row also gives the guided eps's relative difference from the all-channels_last row (other kernels, fp16).
"""
import torch

import common
from common import build_unets, log, table, time_ms
from minisd.fast.graphs import GuidedUNetGraph

LAYOUTS = [(64, 32, 16, 8), (64, 32, 16), (64, 32), (64,), (), (32, 16, 8)]


def modules_by_resolution(unet):
    """(latent resolution at 512x512, module) for every block of an SD 1.x U-Net."""
    res_in = [64, 64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8]
    res_out = [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    return ([(r, b) for r, b in zip(res_in, unet.input_blocks)] + [(8, unet.middle_block)] +
            [(r, b) for r, b in zip(res_out, unet.output_blocks)] + [(64, unet.out)])


def guided(unet):
    """The guided step, eager (the smoke test's stand-in for the graph)."""
    def step(x, t, c):
        e_u, e_c = unet(torch.cat([x, x]), t, c).chunk(2)
        return e_u + 7.5 * (e_c - e_u)
    return step


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batches", default="1,4")
    args = p.parse_args(argv)
    dev, rec = common.start("layout", args)
    if (dev.type != "cuda" or args.tiny) and not args.smoke:
        raise SystemExit("bench/layout.py times the SD 1.4 U-Net's CUDA graph: run it on a GPU (or --smoke)")
    dt = torch.float32 if args.smoke else torch.float16
    unet = build_unets(dev, dt, args.smoke)[1]
    h = 8 if args.smoke else 64  # the tiny U-Net's blocks sit at 8/64 of SD 1.4's resolutions
    ctx = torch.randn(2, 77, unet.cfg.context_dim, device=dev, dtype=dt)
    for B in [1] if args.smoke else map(int, args.batches.split(",")):
        x, c, ref = torch.randn(B, 4, h, h, device=dev, dtype=dt), ctx.repeat_interleave(B, 0), None
        for levels in LAYOUTS[:2] if args.smoke else LAYOUTS:
            for res, m in modules_by_resolution(unet):
                m.to(memory_format=torch.channels_last if res in levels else torch.contiguous_format)
            step = GuidedUNetGraph(unet, x, c, 7.5) if dev.type == "cuda" else guided(unet)
            ms = min(time_ms(lambda: step(x, 500, c), dev, iters=20) for _ in range(3))
            eps = step(x, 500, c).float()
            ref = eps.clone() if ref is None else ref
            rec.add(batch=B, channels_last=",".join(map(str, levels)) or "none", ms=round(ms, 3),
                    rel_vs_all=float(f"{((eps - ref).norm() / ref.norm()).item():.2g}"))
            step = None  # the graph goes before the next layout is captured
            common.free(dev)
    log(table(rec.rows, ["batch", "channels_last", "ms", "rel_vs_all"]))


if __name__ == "__main__":
    main()
