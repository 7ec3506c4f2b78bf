"""The smallest valid files the loaders take, for the reliability, fuzz and script tests: an SD 1.x LDM checkpoint of
1.4 MB (as .safetensors and as a lightning .ckpt), a character tokenizer, and a kohya adapter for it (190 kB).

Built from minisd's own modules with fixed seeds, so no diffusers import and no download; every load of them
takes tens of milliseconds.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lora
from minisd import AutoencoderKL, StableDiffusion, UNet, UNetConfig, VAEConfig
from minisd.clip import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import load_tokenizer
from minisd.save import save_single_file
from sdfixtures import redraw, save_lightning_ckpt, write_char_tokenizer

TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_levels=(0, 1), context_dim=64)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)  # downscale 2: 16 px images -> 8 x 8 latents
TINY_CLIP = CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                           max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_model(tokenizer_folder):
    """A random-weight StableDiffusion of the tiny configs (the char tokenizer has fewer than 100 tokens)."""
    torch.manual_seed(0)
    unet = redraw(UNet(TINY_UNET), 0)
    vae = redraw(AutoencoderKL(TINY_VAE), 1)
    text = redraw(CLIPTextModel(TINY_CLIP), 2).eval()
    tok = load_tokenizer(write_char_tokenizer(tokenizer_folder))
    return StableDiffusion(unet, vae, text, tok)


def write_tiny_files(root):
    """{'safetensors', 'ckpt', 'tokenizer', 'adapter', 'model'}: the tiny model in both LDM single-file forms, an
    adapter (LoRA on the attention and LoCon on the convs, rank 2, text encoder too) as kohya .safetensors, and the
    model itself (float32; tests that change it work on a copy)."""
    root = Path(root)
    sd = tiny_model(root / "tokenizer")
    save_single_file(sd, root / "tiny.safetensors", dtype=torch.float16)
    save_lightning_ckpt(load_file(str(root / "tiny.safetensors")), root / "tiny.ckpt")
    lora.inject(sd.unet, "a", 2, targets=lora.LOCON_TARGETS, text_encoder=sd.text_encoder, te_rank=2)
    with torch.no_grad():
        for _, layer in lora.network.adapted_layers(sd.unet, sd.text_encoder, "a"):
            layer.adapters["a"].up.normal_(0, 0.1)
    lora.save(root / "adapter.safetensors", sd.unet, sd.text_encoder, "a")
    lora.remove(sd.unet, "a", sd.text_encoder)
    return {"safetensors": root / "tiny.safetensors", "ckpt": root / "tiny.ckpt", "tokenizer": root / "tokenizer",
            "adapter": root / "adapter.safetensors", "model": sd}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """write_tiny_files, once per session (import it into a test module to use it)."""
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 16 x 16 images (the tiny model's VAE halves them to 8 x 8 latents)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.zeros((16, 16, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        a[4:12, 2 * i:2 * i + 6] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def train_argv(tiny, images, out, *extra):
    """On the CPU on every machine: a resumed run must use the kernels its first part used, and the default fp32 is
    what makes --lr 1e3 overflow (bf16 on CUDA does not)."""
    return ["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--data", str(images),
            "--prompt", "a box", "--resolution", "16", "--batch", "2", "--seed", "3", "--out", str(out), "--quiet",
            "--device", "cpu", *map(str, extra)]


def one_line_exit(main, argv):
    """main(argv) must end in SystemExit with one line 'error: ...'; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def train_process(argv, log, setup=""):
    """`python train.py argv` in a new process (not a fork: once this process has run a backward pass on CUDA, torch
    refuses autograd in a forked child), its stderr to `log`; `setup`: Python code run first, e.g. a resource limit.
    One thread, as these tests run (single_thread): a run resumed here then sums in the same order."""
    code = f"{setup}\nimport runpy, sys\nsys.argv[0] = 'train.py'\nrunpy.run_path('train.py', run_name='__main__')"
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=Path(__file__).resolve().parents[1],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
