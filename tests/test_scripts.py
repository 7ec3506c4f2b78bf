"""train.py and sample.py end to end on a small random-weight model, against diffusers where it applies."""
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 64x64 images with captions, in a kohya repeat folder (2 repeats)."""
    folder = tmp_path_factory.mktemp("data")
    sub = folder / "2_thing"
    sub.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.zeros((64, 64, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        a[16:48, 8 * i:8 * i + 24] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(a).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"a box number {i}")
    return folder


def run_train(layouts, images, out, *extra):
    return train.main(["--ckpt", str(layouts["diffusers"]), "--data", str(images), "--out", str(out), "--quiet",
                       "--steps", "8", "--batch", "2", "--lr", "1e-2", "--seed", "1", *extra])


def losses(out):
    return np.loadtxt(out.with_name(out.stem + "-loss.csv"), delimiter=",", skiprows=1)[:, 1]


def test_overfitting_four_images_lowers_the_loss(layouts, images, tmp_path):
    out = tmp_path / "a.safetensors"
    run_train(layouts, images, out, "--steps", "60", "--schedule", "constant", "--blocks", "all")
    loss = losses(out)
    assert len(loss) == 60 and loss[-15:].mean() < 0.8 * loss[:15].mean()


def test_blockwise_table_writes_only_its_blocks(layouts, images, tmp_path):
    out = run_train(layouts, images, tmp_path / "style.safetensors", "--blocks", "in0,out3", "--steps", "2")
    keys = load_file(str(out))
    modules = {k.split(".")[0] for k in keys}
    assert modules and all(m.startswith(("lora_unet_down_blocks_0_", "lora_unet_up_blocks_3_")) for m in modules)
    assert any(m.startswith("lora_unet_down_blocks_0_") for m in modules) and any(m.startswith("lora_unet_up_blocks_3_") for m in modules)


def test_resume_equals_the_uninterrupted_run(layouts, images, tmp_path, capsys):
    full = run_train(layouts, images, tmp_path / "full.safetensors", "--save-every", "4")
    half = tmp_path / "full-step000004.state.pt"
    assert half.is_file() and (tmp_path / "full-step000004.safetensors").is_file()
    capsys.readouterr()
    t0 = time.time()
    resumed = run_train(layouts, images, tmp_path / "resumed.safetensors", "--resume", str(half))
    wall = time.time() - t0
    # the summary's start-up line: this process's parts (not the first run's), adding up to its total
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("start-up "))
    total, parts = re.match(r"start-up ([\d.]+)s to the end of the first step: (.*)$", line).groups()
    seconds = dict((k, float(v)) for k, v in re.findall(r"([a-z ]+) ([\d.]+)s", parts.replace(", ", ",")))
    assert list(seconds) == ["inputs", "model", "adapters", "data", "optimizer", "first step"]  # no capture on a CPU
    assert abs(sum(seconds.values()) - float(total)) <= 0.35 and float(total) <= wall  # 7 numbers, each to 0.1 s
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()  # as if never interrupted (bit for bit where the same kernels run; 1e-6 allows others)
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)
    assert not list(tmp_path.glob(".tmp*"))  # no temporary files left behind


def sample_png(layouts, out, *extra):
    """sample.py's PNG on the CPU in float32, where the reference pipeline runs and the 1/255 contract holds (a GPU
    samples in float16 by default: a few 1/255 off; the GPU paths are checked against eager in test_graphs)."""
    sample.main(["--ckpt", str(layouts["diffusers"]), "--prompt", "a red box", "--negative-prompt", "blurry", "--steps", "4",
                 "--guidance", "7.5", "--height", "64", "--width", "64", "--seed", "5", "--out", str(out),
                 "--device", "cpu", *extra])
    return np.asarray(Image.open(out), dtype=np.int16)


def diffusers_png(pipe):
    img = pipe("a red box", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(5)).images[0]
    return np.asarray(img, dtype=np.int16)


def test_sample_equals_the_diffusers_pipeline_with_and_without_an_adapter(layouts, images, ref_pipe, tmp_path):
    import copy
    ours = sample_png(layouts, tmp_path / "base.png")
    assert np.abs(ours - diffusers_png(ref_pipe)).max() <= 1  # within 1/255 per pixel
    info = Image.open(tmp_path / "base.png").text["parameters"]
    assert info.startswith("a red box\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: ")

    adapter = run_train(layouts, images, tmp_path / "ad.safetensors", "--steps", "20", "--te-rank", "2")
    adapted = sample_png(layouts, tmp_path / "ad.png", "--lora", str(adapter))
    assert np.abs(adapted - ours).max() > 8  # the trained adapter changes the image
    pipe = copy.deepcopy(ref_pipe)
    pipe.load_lora_weights(str(adapter))
    n_file = len({k.split(".")[0] for k in load_file(str(adapter))})
    n_loaded = sum(1 for _, m in list(pipe.unet.named_modules()) + list(pipe.text_encoder.named_modules()) if hasattr(m, "lora_A") and m.lora_A)
    assert n_loaded == n_file  # every module of the file found its place in diffusers
    assert np.abs(adapted - diffusers_png(pipe)).max() <= 1
    assert "<lora:ad:1>" in Image.open(tmp_path / "ad.png").text["parameters"]


def test_sample_sampler_flag_equals_diffusers_and_names_it_as_webui(layouts, ref_pipe, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    ours = sample_png(layouts, tmp_path / "a.png", "--sampler", "euler A")
    sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(**{**ref_pipe.components, "scheduler": sched})
    assert np.abs(ours - diffusers_png(pipe)).max() <= 1
    assert ", Sampler: Euler a, " in Image.open(tmp_path / "a.png").text["parameters"]


@pytest.mark.parametrize("spec, weight, blocks, start, stop", [
    ("F.safetensors", 1.0, None, None, None),
    ("F.safetensors:0.5:OUTD", 0.5, "OUTD", None, None),
    ("F.safetensors:1:lbw=OUTD", 1.0, "OUTD", None, None),
    ("F.safetensors:0.8:OUTD:start=10:stop=30", 0.8, "OUTD", 10, 30),
    ("F.safetensors:1:lbw=in0=1,out3=0.5:stop=5", 1.0, "in0=1,out3=0.5", None, 5),
    ("F.safetensors::in0,out3", 1.0, "in0,out3", None, None),
    ("F.safetensors:1:start=0", 1.0, None, 0, None),
    ("F.safetensors:lbw=ALL:step=5-10", 1.0, "ALL", 5, 10),
])
def test_parse_lora(spec, weight, blocks, start, stop):
    assert sample.parse_lora(spec) == (sample.Path("F.safetensors"), weight, blocks, start, stop)


def test_png_lora_tags_are_lora_block_weight_syntax_and_read_back():
    tag = sample.lbw_tag(sample.parse_lora("d/F.safetensors:0.8:outd:start=10:stop=30"))
    assert tag == "<lora:F:0.8:lbw=OUTD:start=10:stop=30>"
    # any other spec: lbw's 26 values, BASE IN00..IN11 M00 OUT00..OUT11 (counted by hand: in0 = IN01-IN03)
    tag = sample.lbw_tag(sample.parse_lora("F.safetensors:1:in0=1,out3=0.5"))
    assert tag == "<lora:F:1:lbw=0,0,1,1,1," + "0," * 18 + "0.5,0.5,0.5>"
    back = sample.parse_lora("F.safetensors:" + tag.removeprefix("<lora:F:").removesuffix(">"))
    assert sample.lora.parse_block_weights(back.blocks) == sample.lora.parse_block_weights("in0=1,out3=0.5")


def test_step_gates_per_step_values_equal_the_eager_switching():
    """--lora start=/stop= on a 5-step run: the table by hand (1-based steps, stop excluded), and at every step the
    gate vector that a CUDA graph reads (StepGates.gates) equals the on/off state the eager switching leaves."""
    specs = ("F.safetensors:1:start=2:stop=4", "G.safetensors:0.5:stop=3", "H.safetensors", "K.safetensors:1:start=5")
    names, adapters = ["F", "G", "H", "K"], [sample.parse_lora(s) for s in specs]
    table = sample.step_table(names, adapters, 5)
    assert table == {"F": [False, True, True, False, False], "G": [True, True, False, False, False],
                     "K": [False] * 4 + [True]}
    state, switches = {}, []
    gates = sample.minisd.fast.StepGates(table, lambda name, on: (state.__setitem__(name, on), switches.append(name)))
    for i in range(5):
        gates(i)
        assert gates.gates(torch.device("cpu"), torch.float16).tolist() == [float(state[n]) for n in gates.names]
        assert {n: state[n] for n in table} == {n: on[i] for n, on in table.items()}
    assert switches == ["F", "G", "K", "F", "G", "F", "K"]  # only where the state changes
    gates.all_on()  # what a capture sees
    assert all(state.values())
    with pytest.raises(ValueError, match="step 5: the step table has 5 steps"):
        gates(5)


def test_adapter_step_range_equals_diffusers_switching_its_lora_per_step(layouts, images, ref_pipe, tmp_path):
    """start=2:stop=4 of 4 steps: the adapter runs at steps 2 and 3 (1-based, as lora-block-weight counts). The
    reference: diffusers' pipeline with the file's LoRA, switched on after step 1 and off after step 3."""
    import copy
    adapter = run_train(layouts, images, tmp_path / "ad.safetensors", "--steps", "20")  # U-Net only
    ours = sample_png(layouts, tmp_path / "r.png", "--lora", f"{adapter}:1:start=2:stop=4")
    pipe = copy.deepcopy(ref_pipe)
    pipe.load_lora_weights(str(adapter))
    switch = {0: pipe.enable_lora, 2: pipe.disable_lora}  # at the end of 0-based steps 0 and 2

    def callback(pipe, i, t, kwargs):
        switch.get(i, lambda: None)()
        return kwargs
    pipe.disable_lora()
    img = pipe("a red box", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(5), callback_on_step_end=callback).images[0]
    assert np.abs(ours - np.asarray(img, dtype=np.int16)).max() <= 1
    always = sample_png(layouts, tmp_path / "a.png", "--lora", str(adapter))
    assert np.abs(ours - always).max() > 4 and np.abs(ours - diffusers_png(ref_pipe)).max() > 4
    assert "<lora:ad:1:start=2:stop=4>" in Image.open(tmp_path / "r.png").text["parameters"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--height", "60"], "multiples of 8"),
    (["--lora", "missing.safetensors"], "missing.safetensors: no such file"),
    (["--lora", "x.safetensors:1:BOGUS"], "preset"),
    (["--ckpt", "/nonexistent"], "/nonexistent: no such file"),
    (["--sampler", "euler"], "--sampler: unknown sampler 'euler'; choose from DDIM, DPM++ 2M Karras, Euler a"),
    (["--sampler", "DPM++ 2M Karras", "--eta", "0.5"], "--eta is DDIM's"),
    (["--lora", "x.safetensors:1:lbw=1,0,1"], "lbw=1,0,1: a block-weight vector has 17 values"),
    (["--lora", "x.safetensors:1:lbw="], "lbw= is empty"),
    (["--lora", "x.safetensors:nan"], "weight nan is not a finite number"),
    (["--lora", "x.safetensors:1:lbw=" + ",".join(["1"] * 16 + ["1e999"])], "is not a finite number"),
    (["--lora", "x.safetensors:1:OUTD:start=30:stop=10"], "start=30 is after stop=10"),
    (["--lora", "x.safetensors:1:start=-1"], "start=-1 is not a step number"),
])
def test_sample_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    if "x.safetensors" in argv[1]:
        (tmp_path / "x.safetensors").write_bytes(b"")
        argv = ["--lora", str(tmp_path / argv[1])] + argv[2:]
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--out", str(tmp_path / "o.png")])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_train_refuses_an_empty_folder_before_loading(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")])


def test_bf16_training_follows_float32(layouts, images, tmp_path):
    """--mixed-precision bf16 (a bf16 base run as it is, no autocast) computes the float32 run's losses up to bf16
    rounding, for LoRA and LoCon."""
    for algo in ("lora", "locon"):
        runs = [losses(run_train(layouts, images, tmp_path / f"{algo}-{mp}.safetensors", "--steps", "4", "--algo", algo,
                                 "--mixed-precision", mp)) for mp in ("no", "bf16")]
        np.testing.assert_allclose(runs[1], runs[0], rtol=0.05)
