"""Where minisd's GPU time goes: a kernel-level profile of the training step's model work and of a guided step.

    python bench/kernel_profile.py --out out/bench/kernels.json
    python bench/kernel_profile.py --smoke --out /tmp/k.json     # the test suite's CPU smoke test: tiny U-Net, "copies" only

train: forward + backward of the frozen SD 1.4 U-Net with rank-16 adapters on attention + feed-forward (bf16
       base, bf16 autocast or none, channels_last), as bench/overhead.py's minisd+fused rows; batch 8 and 32.
       Also which lines copy how many MB (forward: the calling lines; backward: the autograd node).
sample: one guided step (fp16, CFG: the U-Net on batch 2), no autograd, channels_last.
graph: the sampler's guided step as minisd.fast.graphs captures it (all forms), batch 1 and 4: every kernel of the graph
       replay, by kind; compute (attention, convolutions, GEMMs) vs memory-bound kernels vs the time between kernels.
ops: the same step per aten op and input shapes (torch.profiler's self CUDA time; kernel rows left out).
Eager calls under torch.profiler (the kernels are those the CUDA graphs replay); CUDA time summed per kernel name
and per kind. Also: the training row timed from a CUDA graph with each SDPA backend forced.
"""
import re
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from common import build_unets, free, graphed, log, table, time_ms

import lora

KINDS = [("attention", r"fmha|flash|attention|sdpa|softmax"), ("conv", r"conv|fprop|dgrad|wgrad|implicit"),
         ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitk"), ("norm", r"norm|moments|welford"),
         ("copy/cast/cat", r"copy|cat|transpose|permute"), ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
         ("reduce", r"reduce")]


def kind(name):
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def profile(fn, steps=2):
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time / 1e3 / steps  # ms per call
            per_kernel[e.name][1] += 1 / steps
    return per_kernel


def per_op(fn, top):
    """Self CUDA time of each aten op (grouped by input shapes) in one call of fn, in ms: the op rows only, so no
    kernel is counted twice."""
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
        fn()
        torch.cuda.synchronize()
    ops = [e for e in p.key_averages(group_by_input_shape=True) if e.key.startswith("aten::") and e.self_device_time_total]
    total = sum(e.self_device_time_total for e in ops) / 1e3
    rows = [dict(op=e.key, calls=e.count, ms=round(e.self_device_time_total / 1e3, 3),
                 pct=round(100 * e.self_device_time_total / 1e3 / total, 1), shapes=str(e.input_shapes)[:100])
            for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:top]]
    return total, rows


def copies(fn):
    """MB moved by copy-like aten ops (copy_, _to_copy, clone, cat, contiguous) per source: the minisd/lora lines
    that called them in the forward, the autograd node in the backward."""
    import traceback
    from torch.utils._python_dispatch import TorchDispatchMode
    moved, calls = defaultdict(float), defaultdict(int)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if re.search(r"copy|clone|cat|contiguous", name):
                node = torch._C._current_autograd_node()
                where = node.name() if node is not None else " < ".join(
                    f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(traceback.extract_stack())
                    if re.search(r"minisd|lora", f.filename))[:90]
                t = out if isinstance(out, torch.Tensor) else args[0]
                moved[f"{name} {where}"] += t.numel() * t.element_size() / 2 ** 20
                calls[f"{name} {where}"] += 1
            return out
    with Count():
        fn()
    return [dict(source=k, mb=round(v, 1), calls=calls[k]) for k, v in sorted(moved.items(), key=lambda kv: -kv[1])]


def groupnorm_rows(dev):
    """GroupNorm on a channels_last activation, replayed from a graph: PyTorch's (which returns NCHW; the
    channels_last copy the next conv makes is counted) vs minisd.fast.groupnorm's. fp16 forward; bf16 forward +
    backward."""
    from minisd.fast.groupnorm import group_norm_nhwc
    rows = []
    for B, C, H in [(2, 320, 64), (2, 640, 32), (2, 1280, 16), (2, 1280, 8), (8, 320, 64), (8, 1280, 16), (32, 320, 64),
                    (32, 1280, 16)]:
        w, b = torch.randn(C, device=dev) * 0.1 + 1, torch.randn(C, device=dev) * 0.1
        for dt, train in ((torch.float16, False), (torch.bfloat16, True)):
            x = torch.randn(B, C, H, H, device=dev, dtype=dt).to(memory_format=torch.channels_last).requires_grad_(train)
            gy = torch.randn_like(x)
            wd, bd = w.to(dt), b.to(dt)
            row = dict(section="groupnorm", shape=f"{B}x{C}x{H}x{H}", dtype=str(dt)[6:], mode="fwd+bwd" if train else "fwd")
            for impl, f in (("pytorch", lambda: F.group_norm(x, 32, wd, bd, 1e-5).contiguous(memory_format=torch.channels_last)),
                            ("nhwc", lambda: group_norm_nhwc(x, 32, wd, bd, 1e-5))):
                fn = (lambda f=f: torch.autograd.grad(f(), x, gy)) if train else f
                with torch.set_grad_enabled(train):
                    row[impl + "_us"] = round(time_ms(graphed(fn, dev), dev, iters=50) * 1e3, 1)
            rows.append(row)
    return rows


class Setup:
    """The models the sections profile: the bf16 U-Net with rank-16 adapters on attention + feed-forward (the
    training row), and an fp16 U-Net for the sampler's step, built on first use."""

    def __init__(self, dev, tiny):
        self.dev, self.tiny = dev, tiny
        _, self.unet = build_unets(dev, torch.bfloat16, tiny)
        self.h, self.D = (8, self.unet.cfg.context_dim) if tiny else (64, 768)
        self.unet.to(memory_format=torch.channels_last)
        lora.inject(self.unet, "a", 16, targets=("attn", "ff"), generator=torch.Generator(dev).manual_seed(1))
        self.params = lora.trainable_parameters(self.unet, "a")
        self.g = torch.Generator(dev).manual_seed(2)
        self.unet_h = None

    def train_case(self, B, amp=True):
        """forward + backward of the adapted U-Net at batch B (bf16 autocast, or bf16 weights alone)."""
        dev, h, g = self.dev, self.h, self.g
        x = torch.randn(B, 4, h, h, device=dev, generator=g, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (B,), device=dev, generator=g)
        ctx = torch.randn(B, 77, self.D, device=dev, generator=g, dtype=torch.bfloat16)

        def fwd_bwd():
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp, cache_enabled=False):
                eps = self.unet(x, t, ctx)
            return torch.autograd.grad(eps.float().square().mean(), self.params)
        return fwd_bwd

    def sample_step(self):
        """One guided step's U-Net call (fp16, batch 2)."""
        if self.unet_h is None:
            self.unet_h = build_unets(self.dev, torch.float16, self.tiny)[1].to(memory_format=torch.channels_last)
        x = torch.randn(2, 4, self.h, self.h, device=self.dev, dtype=torch.float16).to(memory_format=torch.channels_last)
        t = torch.tensor([500, 500], device=self.dev)
        ctx = torch.randn(2, 77, self.D, device=self.dev, dtype=torch.float16)
        return lambda: self.unet_h(x, t, ctx)


def add_kinds(rec, args, name, per_kernel, replay_ms=None):
    """One "kinds" row (CUDA ms per kind of kernel) and the top kernels of a profile. With replay_ms (a graph's
    replay time) the row also splits it: between kernels, compute (attention, convolutions, GEMMs), memory-bound."""
    total = sum(v[0] for v in per_kernel.values())
    kinds = defaultdict(float)
    for k, (ms, _) in per_kernel.items():
        kinds[kind(k)] += ms
    split = {}
    if replay_ms is not None:
        compute = sum(kinds[k] for k in ("attention", "conv", "matmul"))
        split = dict(replay_ms=round(replay_ms, 2), between_kernels_ms=round(replay_ms - total, 2),
                     kernels=round(sum(v[1] for v in per_kernel.values())), compute_ms=round(compute, 2),
                     memory_bound_ms=round(total - compute, 2))
    rec.add(section="kinds", case=name, total_ms=round(total, 2), **split,
            **{k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])})
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]
    rows = [dict(case=name, kernel=k[:110], kind=kind(k), ms=round(ms, 3), pct=round(100 * ms / total, 1),
                 calls=round(n)) for k, (ms, n) in top]
    rec.meta.setdefault("top", {})[name] = rows
    log(table(rows, ["kind", "ms", "pct", "calls", "kernel"]))


def copies_section(rec, args, setup, batch):
    for amp in (True, False):
        case = f"train b{batch} amp={amp}"
        try:
            rows = copies(setup.train_case(batch, amp))[:args.top]
            rec.meta.setdefault("copies", {})[case] = rows
            rec.add(section="copies", case=case, top_mb=round(sum(r["mb"] for r in rows), 1))
            log(f"copies, train b{batch}, autocast={amp}: {sum(r['mb'] for r in rows):.0f} MB in the top {args.top}")
            log(table(rows, ["mb", "calls", "source"]))
        except Exception as e:
            rec.error(f"copies amp={amp}", e)


def profile_section(rec, args, setup, batches):
    cases = [(f"train b{B}{' bf16' if not amp else ''}", setup.train_case(B, amp))
             for B in batches for amp in (True, False)]
    for name, fn in cases + [("sample fp16 b1", None)]:
        try:
            free(setup.dev)
            if fn is None:
                with torch.no_grad():
                    per_kernel = profile(setup.sample_step())
            else:
                per_kernel = profile(fn)
            add_kinds(rec, args, name, per_kernel)
        except Exception as e:
            rec.error(name, e)


def graph_section(rec, args, setup):
    """The sampler's step as it runs: the kernels of its CUDA graph, batch 1 and 4."""
    from minisd.fast.graphs import GuidedUNetGraph
    dev, h, D = setup.dev, setup.h, setup.D
    for B in (1, 4):
        try:
            setup.sample_step()  # builds the fp16 U-Net
            free(dev)
            x = torch.randn(B, 4, h, h, device=dev, dtype=torch.float16)
            ctx = torch.randn(2 * B, 77, D, device=dev, dtype=torch.float16)
            graph = GuidedUNetGraph(setup.unet_h, x, ctx, 7.5)
            replay = lambda: graph(x, 501, ctx)
            ms = time_ms(replay, dev, iters=20)
            per_kernel = profile(replay, steps=5)
            add_kinds(rec, args, f"guided graph fp16 b{B}", per_kernel, replay_ms=ms)
            graph = None  # its memory goes before the next batch's capture
        except Exception as e:
            rec.error(f"graph b{B}", e)


def sdpa_section(rec, setup, batches):
    """The training row replayed from a graph with each SDPA backend forced."""
    for B in batches:
        for backend in ["default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"]:
            try:
                free(setup.dev)
                fn = setup.train_case(B)
                if backend != "default":
                    inner, be = fn, getattr(SDPBackend, backend)

                    def fn():
                        with sdpa_kernel(be):
                            return inner()
                ms = time_ms(graphed(fn, setup.dev), setup.dev, iters=max(2, 16 // B))
                rec.add(section="sdpa", batch=B, backend=backend, ms=round(ms, 2))
            except Exception as e:
                rec.error(f"sdpa {backend} b{B}", e)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sections", default="groupnorm,copies,profile,ops,graph,sdpa")
    args = p.parse_args(argv)
    dev, rec = common.start("kernels", args)
    if args.smoke:  # the profiles read CUDA time: only the copy counts run on a CPU
        args.batches, args.sections = "1", "copies"
    elif dev.type != "cuda":
        raise SystemExit("bench/kernel_profile.py profiles CUDA kernels: run it on a GPU (or --smoke)")
    setup = Setup(dev, args.tiny)
    batches = list(map(int, args.batches.split(",")))
    sections = args.sections.split(",")
    if "copies" in sections:
        copies_section(rec, args, setup, batches[0])
    for row in groupnorm_rows(dev) if "groupnorm" in sections else []:
        rec.add(**row)
    log(table([r for r in rec.rows if r["section"] == "groupnorm"], ["shape", "dtype", "mode", "pytorch_us", "nhwc_us"]))
    if "profile" in sections:
        profile_section(rec, args, setup, batches)
    if "ops" in sections:
        with torch.no_grad():
            total, rows = per_op(setup.sample_step(), args.top)
        rec.meta["ops"] = {"sample fp16 b1": rows}
        rec.add(section="ops", case="sample fp16 b1", total_ms=round(total, 2))  # also writes the JSON
        log(table(rows, ["ms", "pct", "calls", "op", "shapes"]))
    if "graph" in sections:
        graph_section(rec, args, setup)
    if "sdpa" in sections:
        sdpa_section(rec, setup, batches)
    log(table([r for r in rec.rows if r["section"] == "kinds"], ["case", "total_ms", "replay_ms", "between_kernels_ms",
                                                                "compute_ms", "memory_bound_ms", *(k for k, _ in KINDS), "other"]))
    log(table([r for r in rec.rows if r["section"] == "sdpa"], ["batch", "backend", "ms"]))


if __name__ == "__main__":
    main()
