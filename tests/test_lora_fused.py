"""The fused LoRA / LoCon autograd functions against the plain composition: values and gradients."""
import pytest
import torch
import torch.nn as nn

from lora.fused import LoConConv2dFunction, LoRALinearFunction
from lora.layers import LoConConv2d, LoRALinear

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest

# (rank, alpha, global weight, block weight) per adapter: gains that are not powers of two
ADAPTERS = [(3, 5.0, 0.7, 1.3), (5, 2.0, 1.1, 0.6), (2, 7.0, -0.9, 1.0)]


def adapted(layer, n, seed=0):
    """Wrap a frozen base layer and add n adapters with random (nonzero) up weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layer = (LoRALinear if isinstance(layer, nn.Linear) else LoConConv2d)(layer.requires_grad_(False))
    for i, (rank, alpha, mult, block) in enumerate(ADAPTERS[:n]):
        a = layer.add_adapter(f"a{i}", rank, alpha, generator=g)
        with torch.no_grad():
            a.up.normal_(0, 0.5, generator=g)
        a.global_weight, a.block_weight = mult, block
    return layer


def run(layer, x, fused):
    """Output and gradients (x, then every down and up) of a fixed random loss."""
    layer.fused = fused
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [p for a in layer.adapters.values() for p in (a.down, a.up)]
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)
    grads = torch.autograd.grad((y * weights).sum(), [x, *params])
    return y, grads


def assert_same(layer, x, fn, fold=None):
    y_fused, g_fused = run(layer, x, True)
    assert isinstance(y_fused.grad_fn, fn._backward_cls), "the fused path was not taken"
    assert fold is None or y_fused.grad_fn.fold == fold
    y_plain, g_plain = run(layer, x, False)
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens,fold", [(7, False), (16, True)])  # 14 or 32 rows against 24 input features
def test_linear_fused_equals_plain(n, bias, tokens, fold):
    layer = adapted(nn.Linear(24, 20, bias=bias), n)
    assert_same(layer, torch.randn(2, tokens, 24), LoRALinearFunction, fold)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 2, 0, 1), (3, 1, 2, 2), (1, 1, 0, 1)])
@pytest.mark.parametrize("size", [(9, 11), (4, 3)])  # folded at 9x11; at 4x3 the output has fewer pixels than 6*k*k
def test_conv_fused_equals_plain(n, kernel, stride, padding, dilation, size):
    layer = adapted(nn.Conv2d(6, 10, kernel, stride, padding, dilation), n)
    x = torch.randn(2, 6, *size)
    out = nn.functional.conv2d(x, layer.weight, None, stride, padding, dilation)
    assert_same(layer, x, LoConConv2dFunction, out[:, 0].numel() >= 6 * kernel * kernel)


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("size", [(9, 11), (2, 2)])
def test_conv_fused_equals_plain_channels_last(kernel, size):
    """channels_last: folded in the kernel's own layout, or (small maps) the up projection as one GEMM on the
    [N*H*W, C] view; the output stays channels_last."""
    layer = adapted(nn.Conv2d(6, 10, kernel, padding=kernel // 2), 2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, *size).to(memory_format=torch.channels_last)
    assert_same(layer, x, LoConConv2dFunction, 2 * size[0] * size[1] >= 6 * kernel * kernel)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(16, 12), (16, 16)), (lambda: nn.Conv2d(4, 6, 3, 2, 1), (4, 4, 8, 8))])
def test_no_grad_uses_folded_weight(make, shape):
    """Without autograd the fused path runs only the forward's ops (folded: one base op on W + sum g B A)."""
    layer = adapted(make(), 3)
    x = torch.randn(shape)
    for x in (x, x[:1]):  # folded, and (fewer rows than weight columns) not
        with torch.no_grad():
            layer.fused = True
            y = layer(x)
            layer.fused = False
            y_plain = layer(x)
        assert y.grad_fn is None
        torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)


def test_base_gets_no_gradient_and_trainable_base_uses_plain_path():
    layer = adapted(nn.Linear(8, 8), 2)
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert all(a.down.grad is not None and a.up.grad is not None for a in layer.adapters.values())
    layer.weight.requires_grad_(True)  # a trainable base: autograd's plain composition gives its gradient
    y = layer(torch.randn(3, 8))
    assert not isinstance(y.grad_fn, LoRALinearFunction._backward_cls)
    y.sum().backward()
    assert layer.weight.grad is not None


def test_frozen_adapter_gets_no_gradient():
    layer = adapted(nn.Conv2d(4, 4, 3, padding=1), 2)
    layer.adapters["a1"].requires_grad_(False)
    layer(torch.randn(1, 4, 5, 5)).sum().backward()
    assert layer.adapters["a0"].down.grad is not None and layer.adapters["a1"].down.grad is None


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(16, 12), (4, 16)), (lambda: nn.Conv2d(4, 6, 3, 2, 1), (2, 4, 8, 8))])
def test_autocast_bf16_on_cpu(make, shape):
    layer = adapted(make(), 2)
    x = torch.randn(shape)
    reference, _ = run(layer, x, True)
    layer.fused = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for a in layer.adapters.values():
        assert a.down.grad.dtype == torch.float32 and torch.isfinite(a.up.grad).all()
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(16, 12), (4, 16)), (lambda: nn.Conv2d(4, 6, 3, 2, 1), (2, 4, 8, 8))])
def test_low_precision_base_with_float32_adapters(make, shape):
    """A bf16 base and bf16 activations with float32 adapter masters: computed in bf16, gradients in float32."""
    layer = adapted(make(), 2)
    x = torch.randn(shape)
    reference, _ = run(layer, x, True)
    layer.to(torch.bfloat16)
    for a in layer.adapters.values():
        a.float()
    for fused in (True, False):
        y, grads = run(layer, x.bfloat16(), fused)
        assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in grads[1:])
        torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)


def test_inactive_adapters_are_skipped():
    """Disabled, zero-weighted and merged adapters take no part in the low-rank path."""
    layer = adapted(nn.Linear(8, 6), 3)
    x = torch.randn(5, 8)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    layer.adapters["a0"].enabled = False
    layer.adapters["a1"].block_weight = 0.0
    layer.merge("a2")
    assert layer.active() == []
    torch.testing.assert_close(layer(x), base + x @ layer.delta_weight("a2").T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(320, 640), (2, 64, 320)),
                                        (lambda: nn.Conv2d(64, 96, 3, 2, 1), (2, 64, 16, 16))])
def test_cuda_fused_equals_plain(dtype, make, shape):
    """On a GPU, float32 layers with float32 adapters, under autocast for bf16 / fp16."""
    layer = adapted(make(), 3).cuda()
    x = torch.randn(shape, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        (y_fused, g_fused), (y_plain, g_plain) = run(layer, x, True), run(layer, x, False)
    assert y_fused.dtype == dtype and all(g.dtype == torch.float32 for g in g_fused[1:])
    tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]  # float32 convs use TF32
    for a, b in zip((y_fused, *g_fused), (y_plain, *g_plain)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() <= tol
