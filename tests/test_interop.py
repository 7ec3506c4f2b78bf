"""Files other tools read: the text encoder in the released SD 1.x layout, the CLIP tokenizer shipped with the
package, and the hashes AUTOMATIC1111 / kohya write."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minisd
from tinyfiles import tiny  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
CLIP_PARTS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1",
              "mlp.fc1", "mlp.fc2", "layer_norm2")


def released_clip_names(layers):
    """The tensor names of SD 1.4's text_encoder/model.safetensors (openai/clip-vit-large-patch14's text tower),
    written out by hand: 197 for its 12 layers."""
    names = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
             "text_model.embeddings.position_ids", "text_model.final_layer_norm.weight",
             "text_model.final_layer_norm.bias"]
    return {*names, *(f"text_model.encoder.layers.{i}.{part}.{w}" for i in range(layers) for part in CLIP_PARTS
                      for w in ("weight", "bias"))}


def file_keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_released_names_are_sd14s():
    assert len(released_clip_names(12)) == 197


def test_text_encoder_written_in_the_released_layout(lora_sd, tmp_path):
    """save_diffusers / save_single_file write `text_model.` names (+ position_ids), transformers reads them with no
    missing or unexpected key, and transformers and minisd.load give the same hidden states."""
    from transformers import CLIPTextModel
    from minisd.save import save_diffusers, save_single_file
    sd = lora_sd
    layers = sd.text_encoder.config.num_hidden_layers
    save_diffusers(sd, tmp_path / "folder", dtype=torch.float32)
    save_single_file(sd, tmp_path / "single.safetensors", dtype=torch.float32)
    assert file_keys(tmp_path / "folder" / "text_encoder" / "model.safetensors") == released_clip_names(layers)
    prefix = "cond_stage_model.transformer."
    single = {k[len(prefix):] for k in file_keys(tmp_path / "single.safetensors") if k.startswith(prefix)}
    assert single == released_clip_names(layers)
    config = json.loads((tmp_path / "folder" / "text_encoder" / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    theirs, info = CLIPTextModel.from_pretrained(tmp_path / "folder" / "text_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    again = minisd.load(tmp_path / "folder")
    ids = torch.randint(0, config["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = theirs(ids).last_hidden_state
        for model in (sd.text_encoder, again.text_encoder):
            assert (model(ids) - ref).abs().max() < 1e-5


def test_shipped_tiny_text_encoder_is_in_the_released_layout():
    folder = ROOT / "weights" / "tiny" / "text_encoder"
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert file_keys(folder / "model.safetensors") == released_clip_names(layers)


@pytest.mark.skipif(not os.environ.get("MINISD_TRANSFORMERS4"), reason="set MINISD_TRANSFORMERS4 to a folder holding "
                    "transformers 4.x (pip install --target DIR --no-deps 'transformers<5' 'tokenizers<0.22' "
                    "'huggingface-hub<1')")
def test_transformers4_loads_the_text_encoder(lora_sd, tmp_path):
    """transformers 4.x (kohya's, webui's, InvokeAI's pins) loads the written text encoder with every tensor."""
    from minisd.save import save_diffusers
    save_diffusers(lora_sd, tmp_path, dtype=torch.float32)
    ids = torch.randint(0, lora_sd.text_encoder.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "out": lora_sd.text_encoder(ids)}, tmp_path / "ref.pt")
    script = ("import sys, torch, transformers; from transformers import CLIPTextModel\n"
              "assert transformers.__version__.startswith('4.'), transformers.__version__\n"
              "m, info = CLIPTextModel.from_pretrained(sys.argv[1] + '/text_encoder', output_loading_info=True)\n"
              "assert not (info['missing_keys'] or info['unexpected_keys'] or info['mismatched_keys']), info\n"
              "ref = torch.load(sys.argv[1] + '/ref.pt')\n"
              "with torch.no_grad(): d = (m(ref['ids']).last_hidden_state - ref['out']).abs().max().item()\n"
              "assert d < 1e-5, d\n")
    env = {**os.environ, "PYTHONPATH": os.environ["MINISD_TRANSFORMERS4"]}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


PROMPTS = [
    "a photo of a cat",
    "A PHOTO of an Astronaut riding a horse on Mars, 8k, trending on artstation!!!",
    "café crème brûlée, naïve façade, Zürich — Ωμέγα, 東京タワー, 😀🎨 emoji",
    "(masterpiece:1.2), [blurry], {braces} <angle> \"quotes\" 'single' back\\slash #hash @at $5.99 100% a&b ~tilde_",
    "pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious antidisestablishmentarianism",
    "   leading and   multiple   spaces\tand\ttabs\nand newlines   ",
    "don't can't it's we're they'll I'd you've",
    "a1b2c3 1234567890 3.14159 1e-5 0x1F",
    "",
    " ".join(f"word{i} red blue green" for i in range(40)),  # 232 tokens: truncated to 77
]


def clip_single_file(folder, vocab):
    """A tiny single-file checkpoint whose text encoder has `vocab` tokens (49408: SD 1.x's)."""
    from minisd.clip import CLIPTextModel
    from minisd.save import save_single_file
    from tinyfiles import TINY_CLIP, tiny_model
    sd = tiny_model(folder / "chars")
    config = dataclasses.replace(TINY_CLIP, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                 pad_token_id=vocab - 1)
    sd.text_encoder = CLIPTextModel(config).eval()
    save_single_file(sd, folder / "model.safetensors")
    return folder / "model.safetensors"


def test_single_file_loads_with_the_shipped_clip_tokenizer(tmp_path):
    """No tokenizer given, no cache: the CLIP tokenizer shipped in minisd/clip_tokenizer, whose ids equal
    transformers' CLIPTokenizer built from the same vocab.json / merges.txt, and the ids CLIP gives known words."""
    from transformers import CLIPTokenizer
    from minisd.tokenizer import CLIP_TOKENIZER
    sd = minisd.load(clip_single_file(tmp_path, 49408))
    ref = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"))
    assert sd.tokenizer.encode(["a photo of a cat"]) == [[49406, 320, 1125, 539, 320, 2368, 49407]]
    assert sd.tokenizer.encode(PROMPTS) == ref(PROMPTS).input_ids
    assert sd.tokenizer.encode(PROMPTS, special_tokens=False) == ref(PROMPTS, add_special_tokens=False).input_ids
    ids = sd.tokenizer.padded(PROMPTS).tolist()
    assert ids == ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(sd.tokenizer.encode(PROMPTS[-1:])[0]) > 77 and ids[-1][-1] == 49407  # cut, ended by end-of-text


def test_single_file_with_its_own_vocabulary_needs_its_tokenizer(tmp_path):
    with pytest.raises(minisd.CheckpointError, match=r"model.safetensors: the text encoder has 300 tokens, "
                                                     r"CLIP's tokenizer 49408; pass the model's own tokenizer"):
        minisd.load(clip_single_file(tmp_path, 300))


# ---------------------------------------------------------------------------------------------
# Hashes: each expected value below is computed here with hashlib from the file's bytes, by the published rule.

def sha(data):
    return hashlib.sha256(data).hexdigest()


def after_header(raw):
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def test_webui_hashes_by_hand(tmp_path):
    from safetensors.torch import save_file
    from minisd.hashes import lora_hash, model_hash
    cache = tmp_path / "hashes.json"
    tensors = {"a": torch.arange(1000.0), "b": torch.ones(3, 5, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"note": "one"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert model_hash(tmp_path / "x.safetensors", cache) == sha(raw)[:10]
    assert lora_hash(tmp_path / "x.safetensors", cache) == sha(after_header(raw))[:12] != sha(raw)[:12]
    save_file(tensors, str(tmp_path / "y.safetensors"), metadata={"note": "another, longer"})  # metadata only
    assert lora_hash(tmp_path / "y.safetensors", cache) == lora_hash(tmp_path / "x.safetensors", cache)
    assert model_hash(tmp_path / "y.safetensors", cache) != model_hash(tmp_path / "x.safetensors", cache)
    torch.save(tensors, tmp_path / "z.pt")  # not safetensors: the whole file
    assert lora_hash(tmp_path / "z.pt", cache) == sha((tmp_path / "z.pt").read_bytes())[:12]
    (tmp_path / "bad.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(minisd.CheckpointError, match=r"bad.safetensors: not a safetensors file \(header of 1000000"):
        lora_hash(tmp_path / "bad.safetensors", cache)


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    from minisd.hashes import model_hash
    cache, f = tmp_path / "hashes.json", tmp_path / "m.bin"
    f.write_bytes(b"x" * 100)
    assert model_hash(f, cache) == sha(b"x" * 100)[:10]
    table = json.loads(cache.read_text())
    (entry,) = table.values()
    entry["sha256"] = "f" * 64  # the cache answers while the file is unchanged...
    cache.write_text(json.dumps(table))
    assert model_hash(f, cache) == "f" * 10
    stat = f.stat()  # ...and not once its mtime (or size) changes
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_hash(f, cache) == sha(b"x" * 100)[:10]
    f.write_bytes(b"y" * 101)
    assert model_hash(f, cache) == sha(b"y" * 101)[:10]
    cache.write_text("{not json")  # a damaged cache is rebuilt
    assert model_hash(f, cache) == sha(b"y" * 101)[:10] and json.loads(cache.read_text())


def test_a_folders_hash_is_of_the_unet_file_that_load_reads(tmp_path):
    """A diffusers folder with fp16 and fp32 U-Net files: the model hash (and train.py's cached base hash) is keyed
    by the file minisd.load reads, the .safetensors, not the first name in sort order (.fp16.safetensors)."""
    from minisd.hashes import model_hash, unet_file
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a" * 10)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"b" * 10)
    assert unet_file(tmp_path) == tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    assert model_hash(tmp_path, tmp_path / "hashes.json") == sha(b"b" * 10)[:10]


def test_adapter_files_carry_kohyas_hashes_and_mode_0644(tmp_path):
    """sshs_model_hash: sha256 of the bytes after the header (of the file as written: the tensor bytes do not depend
    on the metadata); sshs_legacy_hash: sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of the file the tensors and only the
    ss_* metadata make, first 8 digits. The adapter is large enough (rank 64) that these bytes exist."""
    import lora
    from safetensors.torch import load_file, save as serialize
    from tinyfiles import tiny_model
    sd = tiny_model(tmp_path / "tok")
    lora.inject(sd.unet, "a", 64, targets=lora.LOCON_TARGETS)
    path = tmp_path / "a.safetensors"
    lora.save(path, sd.unet, name="a", metadata={"ss_output_name": "a", "note": "not hashed"})
    raw = path.read_bytes()
    assert len(raw) > 0x110000 and stat_mode(path) == 0o644
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == sha(after_header(raw))
    kohya_file = serialize(load_file(str(path)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == sha(kohya_file[0x100000:0x110000])[:8] != sha(raw[0x100000:0x110000])[:8]
    assert meta["sshs_legacy_hash"] != sha(b"")[:8]


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


def test_sample_png_carries_webui_hashes(tiny, tmp_path, monkeypatch):
    """sample.py's PNG: "Model hash" = sha256(file)[:10], "Lora hashes" = sha256(after the header)[:12], both
    through the on-disk cache."""
    from PIL import Image
    import sample
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "x.png"
    sample.main(["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--lora",
                 str(tiny["adapter"]), "--steps", "1", "--height", "16", "--width", "16", "--out", str(out)])
    text = Image.open(out).text["parameters"]
    model = sha(tiny["safetensors"].read_bytes())[:10]
    adapter = sha(after_header(tiny["adapter"].read_bytes()))[:12]
    assert f"Model hash: {model}," in text and f'Lora hashes: "adapter: {adapter}"' in text
    assert len(json.loads((tmp_path / "cache" / "minisd" / "hashes.json").read_text())) == 2
    assert stat_mode(tiny["adapter"]) == 0o644  # written by lora.save


def test_png_parameters_in_webuis_layout(tmp_path):
    """minisd.images: the `parameters` chunk as webui writes it (prompt, "Negative prompt:" line, "Key: value, ..."),
    read back by PIL; the PNG is written whole (no temporary file left)."""
    from PIL import Image
    from minisd.images import a1111_parameters, save_png
    text = a1111_parameters("a cat <lora:x:0.8>", "blurry", {"Steps": 20, "Sampler": "DDIM", "CFG scale": "7.5",
                                                             "Seed": 3, "Size": "512x768"})
    assert text == ("a cat <lora:x:0.8>\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 512x768")
    save_png(Image.new("RGB", (4, 4), "red"), tmp_path / "a.png", text)
    assert Image.open(tmp_path / "a.png").text["parameters"] == text and os.listdir(tmp_path) == ["a.png"]
    save_png(Image.new("RGB", (4, 4)), tmp_path / "b.png")
    assert "parameters" not in Image.open(tmp_path / "b.png").text


def test_a_hub_name_missing_from_the_cache_is_an_error(tiny):
    """A hub name that is not in the local cache is one line that says how to fetch it."""
    with pytest.raises(minisd.CheckpointError, match="minisd-test/no-such-tokenizer: no CLIP tokenizer found"):
        minisd.load(tiny["safetensors"], tokenizer="minisd-test/no-such-tokenizer")


def test_a_hub_name_in_the_cache_and_a_written_tokenizer(tmp_path, monkeypatch):
    """A hub name is read from the local Hugging Face cache (its snapshot of refs/main); the tokenizer.json minisd
    writes is transformers' own, and the folder is read by transformers' CLIPTokenizer and by minisd from vocab.json
    + merges.txt alone, with the same ids as the shipped files."""
    import shutil
    import huggingface_hub
    from transformers import CLIPTokenizer
    from minisd.tokenizer import CLIP_TOKENIZER, load_tokenizer
    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    shutil.copytree(CLIP_TOKENIZER, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = load_tokenizer("openai/clip-vit-large-patch14")
    assert tok.encode(["a photo of a cat"]) == [[49406, 320, 1125, 539, 320, 2368, 49407]]
    tok.save(tmp_path / "written")
    theirs = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"))
    written = json.loads((tmp_path / "written" / "tokenizer.json").read_text())
    assert written == json.loads(theirs.backend_tokenizer.to_str())  # the whole pipeline, as transformers builds it
    assert CLIPTokenizer.from_pretrained(tmp_path / "written")(PROMPTS).input_ids == tok.encode(PROMPTS)
    (tmp_path / "written" / "tokenizer.json").unlink()
    assert load_tokenizer(tmp_path / "written").encode(PROMPTS) == tok.encode(PROMPTS)


def test_sampling_imports_no_transformers_and_no_dynamo():
    """A fresh process that loads a model and encodes a prompt never imports transformers (its import alone takes
    longer than loading SD 1.4 on a GPU; docs/performance.md), nor torch._dynamo (about a second: on the meta
    device nn.Embedding's own normal_ init imports it, which minisd.clip.embedding avoids)."""
    script = ("import sys, minisd; sd = minisd.load(sys.argv[1]); sd.encode_prompt(['a cat']); "
              "assert 'transformers' not in sys.modules, 'transformers imported'; "
              "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'")
    run = subprocess.run([sys.executable, "-c", script, str(ROOT / "weights" / "tiny")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
