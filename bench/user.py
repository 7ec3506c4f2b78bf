"""What a user runs, minisd against diffusers, on the same random-weight SD 1.4 diffusers folder (full size; written
here by the tests' fixture writer, tests/sdfixtures.py, with a character tokenizer).

    python bench/user.py --out out/bench/user.json          # also writes user.md (the table)
    python bench/user.py --dreambooth PATH/train_dreambooth_lora.py --out out/bench/user.json
    python bench/user.py --smoke --out /tmp/user.json       # the test suite's: tiny model on the CPU, minisd only

sample  a fresh process each: `python sample.py --n N` against a ten-line script with diffusers'
        StableDiffusionPipeline.from_pretrained + DDIMScheduler (DIFFUSERS below), the same prompt, steps, guidance,
        size and seed, fp16 on CUDA. wall_s: launch to exit; first_image_s: launch to the first PNG's mtime.
load    in this process: minisd.load(folder) against StableDiffusionPipeline.from_pretrained(folder).to(device), fp16
        and fp32 (the folder holds fp32 weights), median of --reps.
train   a fresh process each: DreamBooth-LoRA, rank 16, 512², bf16, 16 images, --train-steps (150) at each of
        --train-batches (1), `train.py` against diffusers' examples/dreambooth/train_dreambooth_lora.py (only with
        --dreambooth PATH: it is not part of the diffusers package, and needs accelerate). Wall time, launch to exit,
        includes loading and (train.py) latent caching; steady_images_s counts from a tenth of the run to its end
        (train.py's loss log; the script's progress bar). train.py's rows also hold its start-up line (startup_s and
        its parts, up to the end of the first step), and `python -c "import train"` is timed first (import rows:
        the imports that line leaves out). The order alternates over the settings (and over the reps of sample),
        and every package's files are read once before the first timed process (warm_page_cache). On a GPU, one
        2-step run of each tool, train.py first, precedes the timed ones ("train warm-up" rows: the machine's
        first training process pays its first CUDA kernel loads).
check   the first images of sample.py and of the diffusers script, max abs difference of 8-bit pixels.
"""
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import common
from common import ROOT, SD14, TINY, log, sync

PROMPT = "a photo of a red box on a table"
DIFFUSERS = """import sys, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
folder, n, steps, size, out, device, prompt = sys.argv[1:]
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None).to(device)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
images = pipe(prompt, num_inference_steps=int(steps), guidance_scale=7.5, height=int(size), width=int(size),
              num_images_per_prompt=int(n), generator=torch.Generator("cpu").manual_seed(0)).images
for i, image in enumerate(images):
    image.save(f"{out}-{i:03d}.png")
"""


def write_model(root, tiny):
    """A random-weight SD 1.4 (tiny: the tests' small model) as a diffusers folder."""
    from sdfixtures import make_pipeline
    cfg = TINY if tiny else SD14
    make_pipeline(cfg["unet"], cfg["vae"], cfg["clip"]).save_pretrained(root / "model", safe_serialization=True)
    return root / "model"


def gpu_memory_used():
    """MiB in use on GPU 0 as nvidia-smi reports it (every process's), or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def run(cmd, pngs):
    """(wall s, s to the first PNG under the folder `pngs`, peak GPU MiB, the CompletedProcess) of one fresh process.
    The peak is nvidia-smi's memory.used polled every 0.2 s less what was in use before: this process's share, since
    the benchmark holds no GPU memory of its own between runs."""
    base, peak, done = gpu_memory_used(), [0], threading.Event()

    def poll():
        while base is not None and not done.wait(0.2):
            peak[0] = max(peak[0], gpu_memory_used() - base)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    done.set()
    watcher.join()
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ...: exit {result.returncode}: {result.stderr[-2000:]}")
    first = min((p.stat().st_mtime for p in Path(pngs).glob("*.png")), default=None)
    return wall, None if first is None else first - t0, None if base is None else peak[0], result


def warm_page_cache(packages=("torch", "transformers", "diffusers", "accelerate", "peft", "safetensors")):
    """Read every file of the site-packages folders that hold these packages once (torch's CUDA libraries alone are
    gigabytes), so that the first timed process, whichever tool it runs, does not pay the cold disk that a user pays
    only on the first run after a boot. Returns (files, GB, seconds)."""
    import importlib.util
    t0, files, size = time.time(), 0, 0
    specs = [importlib.util.find_spec(name) for name in packages]
    roots = {Path(spec.origin).parent.parent for spec in specs if spec and spec.origin}  # their site-packages
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        size += len(chunk)
                files += 1
    return files, round(size / 1e9, 2), round(time.time() - t0, 1)


def sampling(rec, args, folder, tmp):
    size, steps = (64, 2) if args.tiny else (512, args.steps)
    script = tmp / "diffusers_sample.py"
    script.write_text(DIFFUSERS)
    impls = ("minisd", "diffusers")[:1 if args.smoke else 2]
    for n in (1, 4):
        for rep in range(args.reps):
            for impl in impls if rep % 2 == 0 else impls[::-1]:  # alternating: neither always runs first
                out = tmp / f"{impl}-{n}-{rep}"
                out.mkdir()
                cmd = ([sys.executable, "sample.py", "--ckpt", folder, "--n", str(n), "--steps", str(steps),
                        "--height", str(size), "--width", str(size), "--seed", "0", "--prompt", PROMPT,
                        "--device", args.device, "--out", out / "sample.png"] if impl == "minisd" else
                       [sys.executable, script, folder, str(n), str(steps), str(size), out / "d", args.device, PROMPT])
                wall, first, mib, _ = run([str(c) for c in cmd], out)
                rec.add(section="sample", impl=impl, n=n, steps=steps, size=size, rep=rep, wall_s=wall,
                        first_image_s=first, peak_gpu_mib=mib)
        if not args.smoke:  # like for like: the first image of each (8-bit; fp16 and other kernels: rounding)
            ours, theirs = (np.asarray(Image.open(p), dtype=np.int16) for p in
                            (tmp / f"minisd-{n}-0" / ("sample.png" if n == 1 else "sample-000.png"),
                             tmp / f"diffusers-{n}-0" / "d-000.png"))
            rec.add(section="check", n=n, first_image_max_abs_diff=int(np.abs(ours - theirs).max()))


def loading(rec, args, folder):
    import minisd
    from diffusers import StableDiffusionPipeline
    for dtype in (("fp32",) if args.smoke else ("fp16", "fp32")):
        dt = common.DTYPES[dtype]
        loads = {"minisd": lambda: minisd.load(folder, device=args.device, dtype=dt),
                 "diffusers": lambda: StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dt,
                                                                              safety_checker=None).to(args.device)}
        impls, times = list(loads)[:1 if args.smoke else 2], {}
        for rep in range(args.reps):
            for impl in impls if rep % 2 == 0 else impls[::-1]:  # alternating: neither always pays the first load
                common.free(args.device)
                t0 = time.perf_counter()
                model = loads[impl]()
                sync(args.device)
                times.setdefault(impl, []).append(time.perf_counter() - t0)
                del model
        for impl in impls:
            rec.add(section="load", impl=impl, dtype=dtype, wall_s=statistics.median(times[impl]))


def training(rec, args, folder, tmp):
    size = 64 if args.tiny else 512
    data = tmp / "images"
    data.mkdir()
    g = np.random.default_rng(0)
    for i in range(16):  # smooth random colour fields, 512²
        small = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(data / f"{i:03d}.png")
    imports(rec, args, tmp)
    # a GPU machine's first training process compiles kernels into the driver's JIT cache (train.py's capture took
    # 8.1 s there on an H100, 1.9 s in the next): one 2-step run of each tool first, so that neither timed row pays it
    if args.device != "cpu":
        train_pair(rec, args, folder, tmp, data, size, 2, 1, ours_first=True, section="train warm-up")
    settings = [(steps, batch) for steps in ([2] if args.tiny else args.train_steps) for batch in args.train_batches]
    for i, (steps, batch) in enumerate(settings):
        train_pair(rec, args, folder, tmp, data, size, steps, batch, ours_first=i % 2 == 0)


def train_pair(rec, args, folder, tmp, data, size, steps, batch, ours_first, section="train"):
    """One DreamBooth-LoRA setting, train.py and diffusers' script (in the order given), each in a fresh process."""
    prompt = "a photo of sks box"
    ours = [sys.executable, "train.py", "--ckpt", folder, "--data", data, "--prompt", prompt, "--resolution", size,
            "--rank", 16, "--steps", steps, "--batch", batch, "--lr", 1e-4, "--seed", 0, "--device", args.device,
            "--mixed-precision", "no" if args.device == "cpu" else "bf16", "--quiet", "--out", tmp / "ours.safetensors"]
    theirs = [sys.executable, args.dreambooth, "--pretrained_model_name_or_path", folder, "--instance_data_dir", data,
              "--instance_prompt", prompt, "--resolution", size, "--rank", 16, "--max_train_steps", steps,
              "--train_batch_size", batch, "--learning_rate", 1e-4, "--lr_scheduler", "constant", "--lr_warmup_steps", 0,
              "--mixed_precision", "bf16", "--seed", 0, "--checkpointing_steps", 10 ** 6, "--output_dir", tmp / "db"]
    pair = (("minisd", ours), ("diffusers", theirs))
    for impl, cmd in pair if ours_first else pair[::-1]:
        if impl == "diffusers" and not args.dreambooth:
            log("  train: diffusers skipped (no --dreambooth PATH)")
            continue
        wall, _, mib, result = run([str(c) for c in cmd], tmp)
        if impl == "minisd":  # train.py's loss log: step, loss, lr, seconds since just before its capture
            lines = (tmp / "ours-loss.csv").read_text().splitlines()[1:]
            progress = [(int(x.split(",")[0]), float(x.split(",")[3])) for x in lines]
        else:  # the script's tqdm bar on stderr, redrawn as "  37/1000 [00:09<03:58,": steps and whole seconds
            bars = re.findall(rf"(\d+)/{steps} \[(\d+):(\d+)<", result.stderr)  # not its loading bars ("6/6 [")
            progress = [(int(n), 60 * int(m) + int(s)) for n, m, s in bars]
        rate = steady(progress, steps)
        rec.add(section=section, impl=impl, steps=steps, batch=batch, size=size, wall_s=wall, peak_gpu_mib=mib,
                steady_images_s=None if rate is None else rate * batch,
                **(startup(result.stdout) if impl == "minisd" else {}))


def steady(progress, steps):
    """Steps per second from the first report at or past a tenth of the run to the last one, from (step, seconds)
    reports; None for runs too short to tell (under 100 steps: the warm-up and smoke runs) or without reports."""
    first = next((p for p in progress if p[0] >= steps // 10), None)
    if steps < 100 or first is None or progress[-1][1] <= first[1]:
        return None
    return (progress[-1][0] - first[0]) / (progress[-1][1] - first[1])


def startup(stdout):
    """train.py's start-up line ("start-up 9.1s to the end of the first step: inputs 0.0s, model 1.1s, ...") as
    {"startup_s": 9.1, "startup_parts": {"inputs": 0.0, ...}}; the imports before it are the "import" rows."""
    line = next((x for x in stdout.splitlines() if x.startswith("start-up ")), None)
    if line is None:
        return {"startup_s": None}
    head, parts = line.split(": ", 1)
    return {"startup_s": float(head.split()[1].rstrip("s")),
            "startup_parts": {k: float(v.rstrip("s")) for k, v in (x.rsplit(" ", 1) for x in parts.split(", "))}}


def imports(rec, args, tmp):
    """`python -c "import train"` in fresh processes (median of --reps): the start-up before train.py's own line."""
    times = [run([sys.executable, "-c", "import train"], tmp)[0] for _ in range(args.reps)]
    rec.add(section="import", impl="minisd", wall_s=statistics.median(times))


def markdown(rows):
    """The rows as a markdown table, minisd beside diffusers."""
    keyed = {}
    for r in rows:
        if r["section"] == "check":
            continue
        what = {"sample": f"sample.py --n {r.get('n')}", "load": f"load {r.get('dtype')}", "import": "import train",
                "train": f"DreamBooth-LoRA {r.get('steps')} steps, batch {r.get('batch')}",
                "train warm-up": f"warm-up, before the rows below: DreamBooth-LoRA {r.get('steps')} steps"}
        keyed.setdefault(what[r["section"]], {}).setdefault(r["impl"], []).append(r)
    med = lambda rs, k: statistics.median(r[k] for r in rs) if rs and rs[0].get(k) is not None else None
    cell = lambda v: "-" if v is None else f"{v:.2f}"
    lines = ["| what | minisd wall s | diffusers wall s | minisd first image s | diffusers first image s "
             "| minisd peak GPU MiB | diffusers peak GPU MiB | minisd steady images/s | diffusers steady images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for what, impls in keyed.items():
        m, d = impls.get("minisd", []), impls.get("diffusers", [])
        keys = ("wall_s", "first_image_s", "peak_gpu_mib", "steady_images_s")
        lines.append("| " + " | ".join([what] + [cell(med(rs, k)) for k in keys for rs in (m, d)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--reps", type=int, default=2, help="runs of each sample / load case (median in the table)")
    p.add_argument("--dreambooth", default=None, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    p.add_argument("--sections", default="sample,load,train")
    p.add_argument("--train-steps", default="150", help="comma-separated training lengths (the smoke run: 2)")
    p.add_argument("--train-batches", default="1", help="comma-separated batch sizes")
    args = p.parse_args(argv)
    args.train_steps = [int(s) for s in args.train_steps.split(",")]
    args.train_batches = [int(b) for b in args.train_batches.split(",")]
    dev, rec = common.start("user", args)
    if args.smoke:
        args.reps = 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        folder = write_model(tmp, args.tiny)
        log(f"wrote {folder} in {time.time() - t0:.1f}s")
        if not args.smoke:
            files, gb, seconds = warm_page_cache()
            rec.meta["page cache"] = f"read {files} files, {gb} GB, of the packages' folders in {seconds} s first"
            log(rec.meta["page cache"])
        sections = {"sample": lambda: sampling(rec, args, folder, tmp), "load": lambda: loading(rec, args, folder),
                    "train": lambda: training(rec, args, folder, tmp)}
        for name, fn in sections.items():
            if name in args.sections.split(","):
                try:
                    fn()
                except Exception as e:  # one failed section leaves the others' rows (the traceback is in the JSON)
                    rec.error(name, e)
    table = markdown(rec.rows)
    log(table)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(f"device: {json.dumps(rec.meta['env'])}\n\n{table}")


if __name__ == "__main__":
    main()
