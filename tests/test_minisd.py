"""minisd against diffusers (the reference) on random-weight SD 1.x models in all three official layouts."""
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minisd
from minisd import CheckpointError
from minisd.checkpoint import unet_prefixes
from minisd.ddim import Schedule, ddim_alphas

LAYOUTS = ["diffusers", "safetensors", "ckpt"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load(layouts, name, **kw):
    return minisd.load(layouts[name], tokenizer=None if name == "diffusers" else layouts["tokenizer"], **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unet_vae_text_match_diffusers(layout, layouts, ref_pipe):
    sd = load(layouts, layout)
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g), torch.tensor([1, 981])
    with torch.no_grad():
        assert rel(sd.unet(x, t, ctx), ref_pipe.unet(x, t, ctx).sample) < 1e-4
        z = torch.randn(1, 4, 8, 8, generator=g)
        img = sd.vae.decode(z)
        assert rel(img, ref_pipe.vae.decode(z).sample) < 1e-4
        assert rel(sd.vae.encode(img)[0], ref_pipe.vae.encode(img).latent_dist.mean) < 1e-4
        ids = ref_pipe.tokenizer(["a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert rel(sd.encode_prompt(["a cat", ""]), ref_pipe.text_encoder(ids).last_hidden_state) < 1e-4


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sampling_matches_pipeline(eta, layouts, ref_pipe):
    sd = load(layouts, "ckpt")
    kw = dict(num_inference_steps=4, guidance_scale=7.5, eta=eta, num_images_per_prompt=2, height=64, width=64)
    ours = sd.sample(["a red cat", "dog"], negative_prompt="blur", steps=4, guidance=7.5, eta=eta, n=2, seed=3,
                     height=64, width=64, progress=False)
    ref = ref_pipe(["a red cat", "dog"], negative_prompt=["blur"] * 2, generator=torch.Generator("cpu").manual_seed(3),
                   output_type="pt", **kw).images
    assert rel(ours, ref) < 1e-4 and (ours - ref).abs().max() < 1 / 255


def test_ddim_schedule_matches_diffusers():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                        steps_offset=1, clip_sample=False)
    ref.set_timesteps(50)
    steps = ddim_alphas(Schedule(), 50)
    assert [t for t, _, _ in steps] == ref.timesteps.tolist()
    assert steps[0][0] == 981 and steps[-1][0] == 1
    ac = ref.alphas_cumprod.double()
    for t, a, a_prev in steps:
        assert abs(a - ac[t]) < 1e-6 and abs(a_prev - (ac[t - 20] if t > 20 else ac[0])) < 1e-6


SCHEDULERS = {  # diffusers' schedulers for SD 1.x's betas, as `from_config` of the released scheduler config makes them
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
}


def diffusers_scheduler(sampler):
    import diffusers
    cls, kw = SCHEDULERS[sampler]
    return getattr(diffusers, cls)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   **kw)


@pytest.mark.parametrize("sampler, steps", [("DPM++ 2M Karras", 6), ("Euler a", 5)])
def test_samplers_match_the_diffusers_pipeline(sampler, steps, layouts, ref_pipe):
    """6 DPM++ steps: a first-order step, four second-order ones and the final one; 5 Euler a steps: fractional
    timesteps (999, 749.25, ...) and four draws of per-step noise from the seed's generator."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**{**ref_pipe.components, "scheduler": diffusers_scheduler(sampler)})
    sd = load(layouts, "ckpt")
    ours = sd.sample(["a red cat", "dog"], negative_prompt="blur", steps=steps, guidance=7.5, n=2, seed=3,
                     height=64, width=64, progress=False, sampler=sampler)
    ref = pipe(["a red cat", "dog"], negative_prompt=["blur"] * 2, generator=torch.Generator("cpu").manual_seed(3),
               output_type="pt", num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=2, height=64,
               width=64).images
    assert rel(ours, ref) < 1e-4 and (ours - ref).abs().max() < 1 / 255
    ddim = sd.sample(["a red cat", "dog"], negative_prompt="blur", steps=steps, n=2, seed=3, height=64, width=64,
                     progress=False)
    assert (ours - ddim).abs().max() > 10 / 255  # another sampler, another image


@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_sampler_schedules_match_diffusers(steps):
    from minisd.samplers import euler_a_sigmas, karras_sigmas
    for sampler, ours in (("DPM++ 2M Karras", karras_sigmas(Schedule(), steps)),
                          ("Euler a", euler_a_sigmas(Schedule(), steps))):
        ref = diffusers_scheduler(sampler)
        ref.set_timesteps(steps)
        sigmas, ts = ours if sampler == "DPM++ 2M Karras" else ours[::-1]
        assert ts == pytest.approx(ref.timesteps.tolist(), abs=1e-3)  # DPM++: the same integers
        # diffusers computes 1 - alphas_cumprod in float32: near t = 0 that cancels to a relative error ~1e-5
        assert sigmas + [0.0] == pytest.approx(ref.sigmas.tolist(), rel=1e-4)


def test_unknown_sampler_and_eta_are_refused(layouts):
    sd = load(layouts, "ckpt")
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose from DDIM, DPM.. 2M Karras, Euler a"):
        sd.sample("a", steps=2, sampler="euler", progress=False)
    with pytest.raises(ValueError, match="eta is DDIM's"):
        sd.sample("a", steps=2, eta=0.5, sampler="euler a", progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True replays a fixed model: this on_step .per-step changes."):
        sd.sample("a", steps=2, cuda_graph=True, on_step=print, progress=False)
    gates = minisd.fast.StepGates({"x": [True, False]}, lambda name, on: None)  # the speed layer takes its own
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        sd.sample("a", steps=2, cuda_graph=True, on_step=gates, progress=False)


def test_full_sd14_names_and_shapes_match_the_official_layout():
    """minisd's native names are the LDM ones: diffusers' own LDM converter turns them into its SD 1.4 model exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        ref_vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=(128, 256, 512, 512), layers_per_block=2)
        unet, vae = minisd.UNet(), minisd.AutoencoderKL()
    for ours, ref, prefix, convert in ((unet, ref_unet, "model.diffusion_model.", convert_ldm_unet_checkpoint),
                                       (vae, ref_vae, "first_stage_model.", convert_ldm_vae_checkpoint)):
        converted = convert({prefix + k: v for k, v in ours.state_dict().items()}, ref.config)
        expected = ref.state_dict()
        assert set(converted) == set(expected)
        assert all(converted[k].shape == expected[k].shape for k in expected)
    assert sum(p.numel() for p in unet.parameters()) == 859520964  # SD 1.4's U-Net


def test_full_sd14_diffusers_names_load_through_the_map():
    """The diffusers -> LDM map covers every key of the full SD 1.4 U-Net and lands on minisd's names and shapes."""
    from diffusers import UNet2DConditionModel
    from minisd.checkpoint import unet_from_diffusers
    with torch.device("meta"):
        ref = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        ours = minisd.UNet()
    mapped = unet_from_diffusers(ref.state_dict(), ours.cfg, "sd14")
    expected = ours.state_dict()
    assert set(mapped) == set(expected) and all(mapped[k].shape == expected[k].shape for k in expected)
    # 5 ends + 3 mid; down: 8 resnets, 6 attentions, 3 downsamplers; up: 12 resnets, 9 attentions, 3 upsamplers
    assert len(unet_prefixes(ours.cfg)) == 8 + 17 + 24


def test_text_encoder_keys_without_text_model_level(layouts, ref_pipe, tmp_path):
    """transformers 5 writes no `text_model.` level and no position_ids; both spellings load."""
    sd = load_file(str(layouts["safetensors"]))
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in sd.items()}
    sd["model_ema.decay"] = torch.tensor(0.9999)  # ignored, like the DDPM buffers
    save_file(sd, str(tmp_path / "t5.safetensors"))
    ours = minisd.load(tmp_path / "t5.safetensors", tokenizer=layouts["tokenizer"])
    ids = ref_pipe.tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert rel(ours.encode_prompt(["a dog"]), ref_pipe.text_encoder(ids).last_hidden_state) < 1e-4


def test_fp16_diffusers_variant(ref_pipe, tmp_path):
    import copy
    pipe = copy.deepcopy(ref_pipe).to(torch.float16)
    pipe.save_pretrained(tmp_path / "sd", variant="fp16")
    assert (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    sd = minisd.load(tmp_path / "sd", dtype=torch.float32)
    assert sd.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():  # the reference: the same fp16-rounded weights, computed in float32
        assert rel(sd.unet(x, 500, ctx), pipe.unet.float()(x, 500, ctx).sample) < 1e-4


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refused to unpickle .*system"):
        minisd.load(path)
    assert not marker.exists()
    with open(tmp_path / "evil2.ckpt", "wb") as f:  # a plain (non-zip) pickle too, in torch.save's protocol (2)
        pickle.dump(Evil(), f, protocol=2)
    with pytest.raises(CheckpointError, match="evil2.ckpt"):
        minisd.load(tmp_path / "evil2.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("model.diffusion_model.out.2.bias"), r"missing \(1\): out.2.bias"),
    (lambda sd: sd.__setitem__("model.diffusion_model.extra.weight", torch.zeros(1)), r"unexpected \(1\): extra.weight"),
    (lambda sd: sd.__setitem__("first_stage_model.quant_conv.bias", torch.zeros(3)), r"shape mismatch"),
    (lambda sd: sd.__setitem__("conditioner.embedders.0.x", torch.zeros(1)), r"SDXL / SD 2.x"),
])
def test_bad_state_dicts_name_the_key_and_file(change, message, layouts, tmp_path):
    sd = load_file(str(layouts["safetensors"]))
    change(sd)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad.safetensors: .*" + message):
        minisd.load(tmp_path / "bad.safetensors", tokenizer=layouts["tokenizer"])


def test_missing_tokenizer_says_how_to_get_it(layouts):
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        minisd.load(layouts["safetensors"], tokenizer="/nonexistent/tokenizer")


def test_export_round_trips_and_diffusers_reads_the_folder(layouts, tmp_path):
    from diffusers import StableDiffusionPipeline
    from minisd.save import save_diffusers, save_single_file
    sd = load(layouts, "ckpt")
    save_diffusers(sd, tmp_path / "folder", dtype=torch.float32)
    save_single_file(sd, tmp_path / "single.safetensors", dtype=torch.float32)
    again = [minisd.load(tmp_path / "folder"), minisd.load(tmp_path / "single.safetensors", tokenizer=layouts["tokenizer"])]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "folder", safety_checker=None)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        ref = sd.unet(x, 10, ctx)
        # the weights come back bit for bit; outputs round differently with other allocations and kernels (1.1e-6
        # relative seen on an AMD EPYC): 1e-5 is float32 rounding, a wrong or missing tensor is off by O(1)
        for other in again:
            for part in ("unet", "vae", "text_encoder"):
                a, b = getattr(sd, part).state_dict(), getattr(other, part).state_dict()
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
            assert rel(other.unet(x, 10, ctx), ref) < 1e-5
        assert rel(pipe.unet(x, 10, ctx).sample, ref) < 1e-5
    ours = sd.sample("a cat", steps=3, height=64, width=64, progress=False)
    theirs = pipe("a cat", num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert (ours - theirs).abs().max() < 1 / 255


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_channels_last_group_norm_matches_pytorch(dtype, tol):
    """minisd.fast.groupnorm's channels_last path: values and input gradient against F.group_norm (float32), with a
    mean of the size of the spread (E[x^2] - mean^2 must not lose the variance)."""
    from minisd.fast.groupnorm import group_norm_nhwc
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 6, 5, generator=g) * 2 + 3).to(dtype).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g) * 0.5 + 1, torch.randn(64, generator=g) * 0.1
    gy = torch.randn(2, 64, 6, 5, generator=g)
    ref = x.detach().float().requires_grad_()
    y_ref = torch.nn.functional.group_norm(ref, 32, w, b, 1e-5)
    gx_ref, = torch.autograd.grad(y_ref, ref, gy)
    x.requires_grad_()
    y = group_norm_nhwc(x, 32, w, b, 1e-5)
    gx, = torch.autograd.grad(y, x, gy.to(dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    for a, r in ((y, y_ref), (gx, gx_ref)):
        assert ((a.float() - r).norm() / r.norm()).item() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_channels_last_on_cuda_matches_nchw(part, monkeypatch):
    """The U-Net and the VAE decoder on CUDA, sped up (minisd.fast.speed_up) and channels_last (the channels_last
    GroupNorm's path, at activations big enough to take it) against NCHW (PyTorch's group_norm), float32 without
    TF32."""
    import minisd.fast.groupnorm
    from minisd.fast import speed_up
    from minisd.unet import UNet, UNetConfig
    from minisd.vae import AutoencoderKL, VAEConfig
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    calls = []
    own = minisd.fast.groupnorm.group_norm_nhwc
    monkeypatch.setattr(minisd.fast.groupnorm, "group_norm_nhwc", lambda *a: calls.append(a[0].shape) or own(*a))
    torch.manual_seed(0)
    if part == "unet":  # 2 x 32 x 256 x 256 activations: 2^22 elements
        cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=64)
        net = speed_up(UNet(cfg)).cuda()
        t, ctx = torch.tensor([10, 900], device="cuda"), torch.randn(2, 7, 64, device="cuda")
        run, x = (lambda x: net(x, t, ctx)), torch.randn(2, 4, 256, 256, device="cuda")
    else:  # a 512² image: 1 x 32 x 512 x 512 activations
        net = speed_up(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2)))).cuda()
        run, x = net.decode, torch.randn(1, 4, 64, 64, device="cuda")
    with torch.no_grad():
        ref = run(x)
        assert not calls
        net.to(memory_format=torch.channels_last)
        out = run(x.to(memory_format=torch.channels_last))
    assert calls and ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_gated_gelu_gradient():
    """The speed layer's GEGLU autograd function: float64 gradcheck, and the values of a * gelu(gate)."""
    from minisd.fast.modules import GatedGELU
    h = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GatedGELU.apply, (h,))
    a, gate = h.chunk(2, dim=-1)
    torch.testing.assert_close(GatedGELU.apply(h), a * torch.nn.functional.gelu(gate), rtol=0, atol=0)


def test_configs_are_frozen_so_a_default_is_never_shared_state():
    """UNet() and AutoencoderKL() take a default config object: it must not be changeable in place."""
    import dataclasses
    from minisd.unet import UNetConfig
    from minisd.vae import VAEConfig
    for cfg, field in ((UNetConfig(), "model_channels"), (VAEConfig(), "ch"), (Schedule(), "beta_end")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, field, 1)


def test_images_to_pil_rounds_and_clamps_and_grid_fills_rows():
    from minisd.images import grid, to_pil
    x = torch.tensor([0.0, 0.5, 1.2, -0.1]).view(1, 1, 2, 2).expand(2, 3, 2, 2)  # 0.5 * 255 = 127.5 rounds to 128
    a, b = to_pil(x)
    assert np.asarray(a)[:, :, 0].tolist() == [[0, 128], [255, 0]] and a.size == (2, 2)
    sheet = np.asarray(grid([a, b, a], cols=2))
    assert sheet.shape == (4, 4, 3) and (sheet[2:, 2:] == 255).all()  # the short row's empty cell stays white


def test_an_error_in_the_model_code_is_not_reported_as_a_bad_checkpoint(layouts, monkeypatch):
    """A researcher's broken layer raises its own error with its traceback, not "not a usable checkpoint"."""
    from minisd import unet

    def broken(self, *args, **kwargs):
        raise TypeError("SpatialTransformer.__init__ is broken")
    monkeypatch.setattr(unet.SpatialTransformer, "__init__", broken)
    with pytest.raises(TypeError, match="SpatialTransformer.__init__ is broken"):
        minisd.load(layouts["diffusers"])
