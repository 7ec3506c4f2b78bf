"""The first attention calls of a fresh process, per SDPA backend: what a training run's warm-up pays before its
first step.

    python bench/first_call.py --out out/bench/first_call.json     # one H200: default first and last, then each
    python bench/first_call.py --smoke --out /tmp/f.json           # the test suite's: CPU, tiny shapes

Each backend runs in a process of its own, in the order given (the default backend first and last, so that the
machine's first process, which also reads the CUDA libraries from disk, is told apart from the backend): one forward
and backward over SD 1.4's attention shapes at 512² (batch 2, 8 heads, bf16: self-attention at the four latent
sizes and cross-attention against 77 tokens), timed from the first call to its end ("first"), then the mean of five
more ("steady").
"""
import argparse
import contextlib
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from common import log, table

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# (query tokens, key tokens, head dim): SD 1.4 at 512², latents 64² .. 8², heads of 40 .. 160 channels
SD14_SHAPES = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80), (256, 256, 160), (256, 77, 160),
               (64, 64, 160), (64, 77, 160)]
TINY_SHAPES = [(64, 64, 8), (64, 77, 8)]


def attention_pass(backend, shapes, device, dtype):
    """One forward and backward of every shape, waited for."""
    for lq, lk, d in shapes:
        q, k, v = (torch.randn(2, 8, n, d, device=device, dtype=dtype, requires_grad=True) for n in (lq, lk, lk))
        with sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] else contextlib.nullcontext():
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(backend, device, tiny):
    """The child process: prints one JSON line of its timings."""
    device = torch.device(device)
    torch.zeros(1, device=device)  # the CUDA context, before the clock
    if device.type == "cuda":
        torch.cuda.synchronize()
    shapes, dtype = (TINY_SHAPES, torch.float32) if tiny else (SD14_SHAPES, torch.bfloat16)
    t0 = time.perf_counter()
    attention_pass(backend, shapes, device, dtype)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        attention_pass(backend, shapes, device, dtype)
    print(json.dumps({"first_s": round(first, 3), "steady_ms": round((time.perf_counter() - t0) / 5 * 1000, 2)}))


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--backends", default="default,flash,efficient,cudnn,math,default")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.device, args.tiny)
    dev, rec = common.start("first_call", args)
    names = ["default", "math"] if args.smoke else args.backends.split(",")
    for position, name in enumerate(names):
        argv = [sys.executable, __file__, "--child", name, "--device", str(dev)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            rec.error(f"{name} (process {position})", RuntimeError(why))
            continue
        rec.add(process=position, backend=name, **json.loads(done.stdout.strip().splitlines()[-1]))
    rec.save()
    log(table(rec.rows, ["process", "backend", "first_s", "steady_ms"]))


if __name__ == "__main__":
    main()
