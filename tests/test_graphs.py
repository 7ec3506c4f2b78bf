"""minisd.graphs: the packed LoRA form used inside captured graphs (CPU), the CPU refusal, and (on CUDA) graph == eager."""
import pytest
import torch
import torch.nn as nn

import lora
from lora.layers import LoRALinear
from minisd import graphs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_packed_adapters_compute_what_the_layer_computes(single_thread):
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40).requires_grad_(False))
    for name, rank in (("a", 4), ("b", 8)):
        layer.add_adapter(name, rank, alpha=rank / 2, generator=g).up.data.normal_(0, 0.1, generator=g)
    layer.configure("b", multiplier=0.7)
    x = torch.randn(3, 5, 24, generator=g)
    with torch.no_grad():
        for mode in ("weight", "factors"):
            ref = layer(x)
            packs = {}
            with graphs._packed_adapters(layer, packs, mode):
                packed = layer(x)
            assert "forward" not in vars(layer)  # the layer's own forward is back
            assert rel(packed, ref) < 1e-6 and len(packs) == 1
            layer.merge("a")  # only "b" remains unmerged
            ref = layer(x)
            with graphs._packed_adapters(layer, {}, mode):
                assert rel(layer(x), ref) < 1e-6
            layer.unmerge("a")


def test_signature_follows_adapter_changes(lora_sd):
    import copy
    unet = copy.deepcopy(lora_sd.unet)
    s0 = graphs._signature(unet)
    lora.inject(unet, "a", 4, targets=("attn",))
    s1 = graphs._signature(unet)
    lora.set_weights(unet, "a", weight=0.5)
    s2 = graphs._signature(unet)
    assert len({s0, s1, s2}) == 3


def test_cuda_graph_needs_cuda(lora_sd):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA"):
        lora_sd.sample("a cat", steps=2, height=64, width=64, progress=False, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_sampling_matches_eager(lora_sd):
    import copy
    sd = copy.copy(lora_sd)
    sd.unet, sd.vae, sd.text_encoder = (copy.deepcopy(m).cuda() for m in (lora_sd.unet, lora_sd.vae, lora_sd.text_encoder))
    kw = dict(steps=4, guidance=7.5, height=64, width=64, n=2, seed=1, progress=False)
    eager = sd.sample(["a cat", "dog"], **kw)
    graphed = sd.sample(["a cat", "dog"], cuda_graph=True, **kw)  # also makes the U-Net channels_last
    assert rel(graphed, eager) < 1e-4 and rel(graphed, sd.sample(["a cat", "dog"], **kw)) < 1e-5
