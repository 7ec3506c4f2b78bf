"""train.py's own speed: the same LoRA run on 1 GPU and on N GPUs (torchrun), each eager (under torchrun:
DistributedDataParallel) and with --cuda-graph (under torchrun: one all-reduce between two graph replays), on a
random-weight SD 1.4-architecture model (written as a diffusers folder, so train.py loads it like a real one) at
512², from the shipped images. Per-GPU batch fixed: N GPUs train on N times the images
per step.

    python bench/ddp.py --batches 8,16 --out out/bench/ddp.json     # >= 2 GPUs
    python bench/ddp.py --tiny --gpus 1 --out /tmp/ddp.json       # smoke test on a CPU: minisd-tiny, one process

images/s are taken from train.py's loss log (<out>-loss.csv, seconds since the loop started), after --warmup steps.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_sd14(folder):
    """Random SD 1.4 U-Net + VAE + 12-layer CLIP text tower (the tiny world's tokenizer: token ids fit any vocab)."""
    import minisd
    from minisd.clip import CLIPTextModel
    tiny = minisd.load(ROOT / "weights" / "tiny")
    torch.manual_seed(0)
    te = CLIPTextModel().eval()  # SD 1.4's shape
    sd = minisd.StableDiffusion(minisd.UNet(minisd.UNetConfig()), minisd.AutoencoderKL(minisd.VAEConfig()), te, tiny.tokenizer)
    minisd.save_diffusers(sd, folder)


def steps_per_s(log, warmup):
    """Optimizer steps per second after `warmup` steps, and every logged loss."""
    rows = list(csv.DictReader(open(log)))
    (s0, t0), (s1, t1) = [(int(r["step"]), float(r["seconds"])) for r in (rows[warmup - 1], rows[-1])]
    return (s1 - s0) / (t1 - t0), [float(r["loss"]) for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count(), help="the N of the N-GPU run")
    p.add_argument("--batches", default="8", help="comma-separated images per step per GPU")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--runs", default="1,1g,N,Ng", help="which runs: 1 or N GPUs, g: --cuda-graph")
    p.add_argument("--tiny", action="store_true", help="minisd-tiny at 64², for a smoke test")
    p.add_argument("--smoke", action="store_true", help="the test suite's CPU smoke test: --tiny, one process on the "
                   "CPU, two images, batch 2, 2 steps")
    p.add_argument("--out", default="out/bench/ddp.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.tiny, args.batches, args.steps, args.warmup, args.runs = True, "2", 2, 1, "1"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ROOT / "data" / "identity"
        if args.smoke:  # two of the shipped images (their captions too)
            data = tmp / "data"
            data.mkdir()
            for f in sorted(p for p in (ROOT / "data" / "identity").iterdir() if p.stem in ("000", "001")):
                shutil.copy(f, data)
        if args.tiny:
            ckpt, size = ROOT / "weights" / "tiny", 64
        else:
            ckpt, size = tmp / "sd14", 512
            t0 = time.time()
            build_sd14(ckpt)
            print(f"random SD 1.4 written in {time.time() - t0:.0f}s", flush=True)
        rows = []
        runs = [(1 if r[0] == "1" else args.gpus, r.endswith("g")) for r in args.runs.split(",")]
        cpu = args.smoke or not torch.cuda.is_available()
        runs = [(1, False)] if cpu else runs
        for batch in map(int, args.batches.split(",")):
            for n, graph in dict.fromkeys(runs):
                launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          f"--nproc-per-node={n}"]
                out = tmp / f"gpus{n}-b{batch}{'-graph' if graph else ''}.safetensors"
                cmd = launch + [str(ROOT / "train.py"), "--ckpt", str(ckpt), "--data", str(data),
                                "--resolution", str(size), "--rank", "16", "--batch", str(batch), "--steps", str(args.steps),
                                "--lr", "1e-4", "--out", str(out), "--quiet"] + (["--cuda-graph"] if graph else ["--eager"]) + \
                    (["--device", "cpu"] if cpu else [])
                t0 = time.time()
                if subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode:
                    print(f"failed: {' '.join(cmd)}", flush=True)
                    continue
                steps_s, losses = steps_per_s(out.with_name(f"{out.stem}-loss.csv"), args.warmup)
                rows.append({"gpus": n, "cuda_graph": graph, "batch_per_gpu": batch, "steps_per_s": steps_s,
                             "images_per_s": steps_s * batch * n, "wall_s": time.time() - t0, "first_losses": losses[:3],
                             "final_loss_mean20": sum(losses[-20:]) / len(losses[-20:])})
                print(json.dumps(rows[-1]), flush=True)
                save(rows, args)
    for r in save(rows, args):
        print(f"batch {r['batch_per_gpu']}/GPU, {r['gpus']} GPU(s){' cuda-graph' if r['cuda_graph'] else ''}: "
              f"{r['images_per_s']:.1f} images/s ({r['vs_first_run']:.2f}x the first run"
              + (f", {r['scaling']:.2f}x one GPU in the same mode)" if r["scaling"] else ")"))


def save(rows, args):
    """Rewritten after every run: a time limit leaves the finished rows."""
    for r in rows:  # against the first run (by default one GPU, eager) of the same per-GPU batch, and one GPU in the same mode
        r["vs_first_run"] = r["images_per_s"] / next(q["images_per_s"] for q in rows if q["batch_per_gpu"] == r["batch_per_gpu"])
        one = [q for q in rows if q["gpus"] == 1 and (q["batch_per_gpu"], q["cuda_graph"]) == (r["batch_per_gpu"], r["cuda_graph"])]
        r["scaling"] = r["images_per_s"] / one[0]["images_per_s"] if one else None
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "model": "minisd-tiny 64²" if args.tiny else "random SD 1.4 512²", "lora": "rank 16, attention + ff + proj (LoRA-LierLa)",
            "mixed_precision": "auto (bf16 on GPU)", "steps": args.steps, "warmup": args.warmup}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
