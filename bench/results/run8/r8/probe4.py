"""scratch: where the graph path's peak memory comes from at batch 1 (not committed)."""
import sys, json, os
import torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from common import build_pipelines, free
from minisd import graphs, forms
import minisd.vae as V
OUT = os.environ["OUT"]
dev = torch.device("cuda")
pipe, sd = build_pipelines(dev, torch.float16, False)
pipe.unet.to("cpu"); pipe.vae.to("cpu"); free(dev)
GB = 2 ** 30
res = {}
def mem(): return round(torch.cuda.memory_allocated() / GB, 3)
own_forward = V.ResnetBlock.forward
def inplace_forward(self, x):
    h = self.conv1(F.silu(self.norm1(x), inplace=True))
    h = self.conv2(F.silu(self.norm2(h), inplace=True))
    return h.add_(self.nin_shortcut(x))
def run(name, forms_=graphs.FORMS, inplace=False):
    graphs.release(sd.unet); graphs.release(sd.text_encoder); free(dev)
    old = graphs.FORMS
    graphs.GuidedUNetGraph.__init__.__defaults__ = tuple(forms_ if d is old else d for d in graphs.GuidedUNetGraph.__init__.__defaults__)
    V.ResnetBlock.forward = inplace_forward if inplace else own_forward
    m0 = mem()
    sd.sample(["a cat"], steps=3, progress=False, cuda_graph=True)
    m1 = mem()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    sd.sample(["a cat"], steps=3, progress=False, cuda_graph=True)
    peak = round(torch.cuda.max_memory_allocated() / GB, 3)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        sd.decode(torch.randn(1, 4, 64, 64, device=dev, dtype=torch.float16))
    dpeak = round(torch.cuda.max_memory_allocated() / GB, 3)
    res[name] = dict(before=m0, after_first=m1, peak_second=peak, decode_peak=dpeak)
    graphs.GuidedUNetGraph.__init__.__defaults__ = tuple(old if d is forms_ else d for d in graphs.GuidedUNetGraph.__init__.__defaults__)
    print(name, res[name], flush=True)
run("all")
run("no_upsample", tuple(f for f in graphs.FORMS if f != "upsample"))
run("no_qkv", tuple(f for f in graphs.FORMS if f != "qkv"))
run("no_forms", ())
json.dump(res, open(f"{OUT}/probe4.json", "w"), indent=1)
