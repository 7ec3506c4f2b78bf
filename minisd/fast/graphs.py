"""CUDA graphs for minisd: record a step's kernels once, then replay them with a single launch.

An eager SD 1.x U-Net step issues ~1,000 small kernels; at small batches the GPU finishes them faster than Python
launches them, so the step is launch-bound. A CUDA graph replays the recorded kernels with no Python in between.
These are wrappers around the unchanged model: nothing here forks the model code.

    eps = guided_unet(unet, x, ctx, guidance, cache)(x, t, ctx)   # what sd.sample() does on CUDA (minisd.fast.FastPath)

GuidedUNetGraph: static input buffers (latents x, timestep t, context ctx); one replay runs the U-Net on [x, x]
against [uncond; cond] and returns the guided eps, eps_u + guidance (eps_c - eps_u), with the guidance folded into
the graph as a constant (the same arithmetic as the eager loop). While capturing, some layers run in forms that
compute the same with less work (the text's cross-attention keys/values from a second graph, 1x1 convolutions
as GEMMs, conv biases folded into adds, the time embedding read from a table, upsampling + conv as a conv on the
small map, the layers before the first cross-attention run once for both halves of the guided batch, ...:
minisd.fast.forms); the model code is unchanged, and a layer the forms were not written for runs as it is.

GraphCache: the graphs of one pipeline (sd.fast.graphs), one per (module, batch, latent size, dtype, guidance);
guided_unet and encode_text capture again whenever something the capture depends on changes: a parameter replaced
or changed in place (merging an adapter), or which LoRA adapters run and with what gain. cache.release(module) frees
a module's graphs. Nothing here changes a module's memory layout: to_channels_last is an explicit call
(minisd.fast.attach makes it on CUDA: docs/performance.md#channels_last-and-groupnorm; the eager path computes the
same function on either layout).

encode_text(text_encoder, ids, cache): the text encoder replayed from a graph (ReplayedCall, captured per shape), as
sample(cuda_graph=True) runs it; the result is a fresh tensor.

LoRA layers (lora.layers.LoRALinear) with active unmerged adapters are captured in a packed form (pack_adapters), made
by their capture interface (capture_weight(), stacked_factors(); minisd.fast.forms):
  "weight"   (default) y = x W'^T + b with W' = W + sum_i g_i U_i A_i computed once per capture into a private copy
             (the base weights stay untouched): exactly the cost of merged adapters, plus the memory of the copies
  "factors"  y = x W^T + b; y += (x [A_1; ...]^T) [g_1 U_1, ...]^T: two extra kernels per layer, no copies
  None       the layers' own forward (lora.fused), which re-stacks the factors on every call

TrainStepGraph: forward + backward + gradient clipping + optimizer step captured as one graph (the optimizer must be
capturable, e.g. torch.optim.AdamW(..., capturable=True); under autocast pass cache_enabled=False), or as two graphs
around an eager call on the flat gradients (reduce_grads: the all-reduce of data-parallel training). The warm-up
steps that must run before a capture are undone: parameters and optimizer state are restored afterwards. No autograd
graph through the parameters may be alive at capture (a kept `loss` from an eager step): autograd would reuse its
gradient accumulators, bound to another stream, and the capture fails.

The outputs are static tensors, overwritten by the next replay: use (or clone) them before calling again.
"""
import contextlib
import gc
import threading
import warnings
import weakref

import torch

from .forms import FORMS, adapted, applied, capture_forms, context_projections, packed_adapters

# Per thread: device index -> the one stream of that thread's warm-ups and captures on it (see _side_stream).
_SIDE_STREAMS = threading.local()
# One capture at a time in a process (see _capture).
_CAPTURE_LOCK = threading.Lock()


def _side_stream():
    """One side stream per device and thread for every warm-up and capture: cuBLAS keeps a workspace per stream it
    has run on (docs/performance.md#memory), so a new stream per capture would hold another one for as long as the
    process lives; a thread of its own, so that one thread's warm-up never lands in another thread's capture."""
    streams = _SIDE_STREAMS.__dict__.setdefault("streams", {})
    device = torch.cuda.current_device()
    if device not in streams:
        streams[device] = torch.cuda.Stream()
    return streams[device]


@contextlib.contextmanager
def _capture(graph, pool=None):
    """torch.cuda.graph on the side stream; one capture at a time in a process, with Python's cyclic garbage
    collector paused.
    - Threads: torch.cuda.graph begins with a device-wide synchronize, which another thread's capture would not
      survive; in "thread_local" mode the other threads' replays, copies and stream waits go on meanwhile.
    - The collector: a dead reference cycle that holds a CUDA graph (a finished training run: its step graph's loss
      function refers back to the run) may otherwise be collected mid-capture; destroying a graph while a stream
      captures invalidates the capture (cudaErrorStreamCaptureInvalidated), and torch.cuda.graph no longer collects
      before it begins. The cycle is collected after the capture instead."""
    with _CAPTURE_LOCK:
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=_side_stream(), capture_error_mode="thread_local"):
                yield
        finally:
            if enabled:
                gc.enable()


def _warm_up(fn, n):
    """Run fn n times on the side stream (as capture requires): allocator, cuDNN/cuBLAS handles and autotuning
    settle."""
    side = _side_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)


class GuidedUNetGraph:
    """One captured guided U-Net step for fixed shapes. guidance None: no CFG (ctx has the batch of x).

    forms: which of minisd.fast.forms.FORMS the capture uses (all by default): layers run in forms that compute the same
    function with fewer kernels. timesteps: the size of the time-embedding table (the schedule's training steps).
    t_dtype: the timestep's dtype, torch.tensor(t)'s as in the eager step: int64 (DDIM, DPM++ 2M Karras) or float32
    (Euler a's fractional timesteps, which have no row in the time table: that form is left out). gated: names of
    adapters whose gain a call sets (gates=, a vector in this order: a step range switches them on and off) without a
    new capture; they must be active at capture. The time table is left out then (it would hold the capture's gains),
    and the context's keys and values are made again at every call (the gates may touch those projections)."""

    def __init__(self, unet, x, ctx, guidance, warmup=3, pack_adapters="weight", packs=None, forms=FORMS,
                 timesteps=1000, t_dtype=torch.int64, gated=()):
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the latents are on {x.device}")
        if set(forms) - set(FORMS):
            raise ValueError(f"forms: unknown {sorted(set(forms) - set(FORMS))}; choose from {FORMS}")
        self.unet, self.guidance = unet, guidance
        self.x, self.ctx = x.detach().clone(), ctx.detach().clone()
        self.t = torch.zeros((), dtype=t_dtype, device=x.device)  # as torch.tensor(t, device=...) in the eager loop
        if t_dtype.is_floating_point or gated:
            forms = tuple(f for f in forms if f != "time_table")
        self.gated = tuple(gated)
        self.gates = torch.ones(len(gated), dtype=x.dtype, device=x.device)  # read by the graph: set per call
        gates = {n: self.gates[i] for i, n in enumerate(gated)}
        self.packs = {} if packs is None else packs  # tensors the graph reads besides the model's own
        self.kv_graph, self.context_of = None, (ctx, ctx._version)  # the context the keys and values were made from
        self.timesteps = timesteps if "time_table" in forms else None
        with torch.no_grad():
            kv = self._capture_context_kv(unet, pack_adapters, gates) if "context_kv" in forms else None
            step_forms = capture_forms(unet, forms, self.packs, x.dtype, self.t, kv, guidance is not None,
                                       timesteps, pack_adapters, gates)
            with applied(step_forms):
                _warm_up(self._step, warmup)
                self.graph = torch.cuda.CUDAGraph()
                with _capture(self.graph, pool=self.kv_graph.pool() if self.kv_graph else None):
                    self.eps = self._step()

    def _capture_context_kv(self, unet, pack_adapters, gates):
        """{projection: static output}: the cross-attention keys and values of self.ctx, from a graph of their own."""
        projections = context_projections(unet)
        if not projections:
            return None
        kv = lambda: [p(self.ctx) for p in projections]
        with applied(packed_adapters(unet, self.packs, pack_adapters, gates) if pack_adapters or gates else {}):
            _warm_up(kv, 1)
            self.kv_graph = torch.cuda.CUDAGraph()
            with _capture(self.kv_graph):
                self.kv = kv()  # static outputs, which the step graph reads
        self.kv_graph.replay()
        return dict(zip(projections, self.kv))

    def _step(self):
        if self.guidance is None:
            return self.unet(self.x, self.t, self.ctx)
        eps_uncond, eps_text = self.unet(torch.cat([self.x, self.x]), self.t, self.ctx).chunk(2)
        return eps_uncond + self.guidance * (eps_text - eps_uncond)

    def __call__(self, x, t, ctx, gates=None):
        """Guided eps for latents x at timestep t (an int, or a float for a float32 graph) with the gated adapters'
        gates (a vector in the order of `gated`; None: as before); the result is overwritten by the next call."""
        if self.timesteps is not None and not 0 <= int(t) < self.timesteps:  # else the gather reads out of bounds
            raise ValueError(f"timestep {t} is outside the table of timesteps 0..{self.timesteps - 1}")
        self.x.copy_(x)
        self.t.fill_(float(t) if self.t.is_floating_point() else int(t))
        if gates is not None:
            self.gates.copy_(gates)
        new = ctx is not self.context_of[0] or ctx._version != self.context_of[1]  # another tensor, or changed in place
        if new:
            self.ctx.copy_(ctx)
            self.context_of = (ctx, ctx._version)  # holds the tensor: its id cannot pass to another one
        if self.kv_graph is not None and (new or self.gated):
            self.kv_graph.replay()
        self.graph.replay()
        return self.eps


def _signature(unet):
    """What a capture depends on besides shapes: the parameter/buffer storages, the parameters' versions (in-place
    changes: packed adapters are copies) and, for LoRA layers, which adapters run, fused or not, and their gains."""
    sig = []
    for m in unet.modules():  # one walk over the modules (not parameters(), buffers() and modules(): 3x the Python)
        sig += [(t.data_ptr(), t._version) for t in m._parameters.values() if t is not None]
        sig += [t.data_ptr() for t in m._buffers.values() if t is not None]
        if adapted(m):  # the adapter layer's own account of what its capture_weight() and stacked_factors() read
            sig.append((id(m), m.capture_signature()))
    return hash(tuple(sig))


class GraphCache:
    """Captured graphs per module (held weakly: a deleted model frees its graphs), each under a key of shapes and
    settings. All of a module's graphs are dropped when its weights or adapters change (_signature): old graphs
    would replay stale kernels."""

    def __init__(self):
        self.entries = weakref.WeakKeyDictionary()  # module -> {"sig": signature, "graphs": {key: graph}, "packs": {}}

    def get(self, module, key, make):
        """The graph of `module` under `key`, made by make(packs) on first use."""
        sig = _signature(module)
        entry = self.entries.get(module)
        if entry is None or entry["sig"] != sig:
            entry = self.entries[module] = {"sig": sig, "graphs": {}, "packs": {}}
        if key not in entry["graphs"]:
            entry["graphs"][key] = make(entry["packs"])
        return entry["graphs"][key]

    def release(self, module=None):
        """Forget (and free) the graphs captured for this module (a U-Net, a text encoder); None: all of them."""
        if module is None:
            self.entries.clear()
        else:
            self.entries.pop(module, None)


def guided_unet(unet, x, ctx, guidance, cache, warmup=3, pack_adapters="weight", timesteps=1000,
                t_dtype=torch.int64, gated=()):
    """The GuidedUNetGraph for these shapes and timestep dtype, from `cache` (a GraphCache; captured on first use)."""
    if x.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, the latents are on {x.device}")
    guidance = None if guidance is None else float(guidance)
    key = (tuple(x.shape), x.dtype, x.device, tuple(ctx.shape), ctx.dtype, guidance, pack_adapters, timesteps, t_dtype,
           tuple(gated))
    return cache.get(unet, key, lambda packs: GuidedUNetGraph(unet, x, ctx, guidance, warmup, pack_adapters, packs,
                                                              timesteps=timesteps, t_dtype=t_dtype, gated=gated))


class ReplayedCall:
    """fn(*tensors) for fixed shapes, captured once: a call copies its tensors into the static inputs, replays, and
    returns the static output (overwritten by the next call)."""

    def __init__(self, fn, inputs, warmup=2):
        if any(t.device.type != "cuda" for t in inputs):
            raise ValueError(f"CUDA graphs need a CUDA device, the inputs are on {inputs[0].device}")
        self.inputs = [t.detach().clone() for t in inputs]
        with torch.no_grad():
            _warm_up(lambda: fn(*self.inputs), warmup)
            self.graph = torch.cuda.CUDAGraph()
            with _capture(self.graph):
                self.out = fn(*self.inputs)

    def __call__(self, *inputs):
        for buf, t in zip(self.inputs, inputs):
            buf.copy_(t)
        self.graph.replay()
        return self.out


def encode_text(text_encoder, ids, cache):
    """text_encoder(ids) replayed from a CUDA graph (captured per shape), as a new tensor: SD 1.4's
    12-layer CLIP tower runs small kernels, launch-bound when eager."""
    ids = ids.to(text_encoder.device)
    call = cache.get(text_encoder, (tuple(ids.shape), ids.device),
                     lambda packs: ReplayedCall(text_encoder, [ids]))
    return call(ids).clone()  # a fresh tensor: a replay writes in place without a version bump that users could see


def to_channels_last(module):
    """Store a module's convolution weights channels_last (in place; a no-op when they are): cuDNN then runs its NHWC
    kernels, and their outputs stay channels_last (minisd.fast.groupnorm keeps them so through the norms). The same
    function on either layout, other kernels: results may differ by rounding."""
    if any(m.weight.ndim == 4 and not m.weight.is_contiguous(memory_format=torch.channels_last)
           for m in module.modules() if isinstance(m, torch.nn.Conv2d)):
        module.to(memory_format=torch.channels_last)


class TrainStepGraph:
    """loss = loss_fn(*inputs); loss.backward(); clip; optimizer.step() -- captured once, replayed per call.

    inputs: example tensors fixing shapes and dtypes; each call copies its tensors into these static buffers.
    loss_fn may draw random numbers on the GPU (timesteps, noise): graph replays advance the generator.
    The gradients live in the graph's memory and are written (not accumulated) by each replay.

    reduce_grads: a function run on one flat tensor holding every gradient, between the backward and the clipping,
    outside the graphs: e.g. `lambda g: dist.all_reduce(g, op=dist.ReduceOp.AVG)` under torchrun. The step is then
    two graphs (forward + backward; clipping + optimizer step) with one eager call between them. (An all-reduce
    captured inside the graph hangs: docs/performance.md#several-gpus; the gradients are views of the flat tensor, as
    DDP's gradient_as_bucket_view, so the call moves them all at once.)"""

    def __init__(self, loss_fn, optimizer, inputs, clip_norm=None, warmup=3, reduce_grads=None):
        self.loss_fn, self.optimizer, self.clip_norm, self.reduce_grads = loss_fn, optimizer, clip_norm, reduce_grads
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.inputs = [t.detach().clone() for t in inputs]
        self.flat = None
        if reduce_grads is not None:
            if len({(p.dtype, p.device) for p in self.params}) != 1:
                raise ValueError("reduce_grads needs parameters of one dtype on one device")
            self.flat = self.params[0].new_zeros(sum(p.numel() for p in self.params))
            start = 0
            for p in self.params:
                p.grad = self.flat[start:start + p.numel()].view_as(p)
                start += p.numel()
        saved = [p.detach().clone() for p in self.params]
        saved_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                       for p in self.params if p in optimizer.state}

        def step():
            self._zero_grads()
            loss = self._forward_backward()
            if reduce_grads is not None:
                reduce_grads(self.flat)
            self._update()
            return loss

        with warnings.catch_warnings():  # torch warns that a capturable optimizer steps uncaptured: intended here
            warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
            _warm_up(step, warmup)  # also creates the optimizer state, which must exist before the capture
        self._zero_grads()
        self.graph = torch.cuda.CUDAGraph()
        if reduce_grads is None:
            with _capture(self.graph):
                self.loss = self._forward_backward()
                self._update()
            self.update_graph = None
        else:  # two graphs sharing one memory pool; the flat gradient tensor was allocated outside both
            self.update_graph = torch.cuda.CUDAGraph()
            with _capture(self.graph):
                self.flat.zero_()
                self.loss = self._forward_backward()
            with _capture(self.update_graph, pool=self.graph.pool()):
                self._update()
        with torch.no_grad():  # undo the warm-up steps: the graph starts from the state we were given
            for p, s in zip(self.params, saved):
                p.copy_(s)
            for p in self.params:
                for k, v in optimizer.state[p].items():
                    if torch.is_tensor(v):
                        v.copy_(saved_state[id(p)][k]) if id(p) in saved_state else v.zero_()

    def _zero_grads(self):
        if self.flat is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.flat.zero_()  # the gradients stay views of it

    def _forward_backward(self):
        loss = self.loss_fn(*self.inputs)
        loss.backward()
        return loss.detach()

    def _update(self):
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
        self.optimizer.step()

    def __call__(self, *inputs):
        """One training step on these inputs; returns the loss (a static tensor, overwritten by the next call)."""
        for buf, t in zip(self.inputs, inputs):
            buf.copy_(t)
        self.graph.replay()
        if self.update_graph is not None:
            self.reduce_grads(self.flat)
            self.update_graph.replay()
        return self.loss
