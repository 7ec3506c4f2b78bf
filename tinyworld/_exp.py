import sys, time, json, torch, torch.nn as nn, numpy as np
import torch.multiprocessing as mp
from tinyworld import classify as C

class Flat(C.Classifier):
    def __init__(self, widths=(32, 64, 96, 128)):
        super().__init__(widths)
        self.heads = nn.ModuleDict({k: nn.Linear(widths[-1] * 16, len(v)) for k, v in C.LABELS.items()})
    def forward(self, images):
        h = self.features(images * 2 - 1).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}

def run(cfg):
    torch.set_num_threads(2)
    name, steps, lr, batch, arch, widths = cfg
    C.Classifier_orig = C.Classifier
    if arch == "flat":
        C.Classifier = Flat
    C_cls = C.Classifier
    orig = C.Classifier
    C.Classifier = lambda: C_cls(tuple(widths))
    t = time.time()
    m = C.train_classifier(steps, 0, "cuda", batch=batch, lr=lr)
    dt = time.time() - t
    acc = C.accuracy(m, 300, 777)
    return name, dt, acc

if __name__ == "__main__":
    cfgs = json.loads(sys.argv[1])
    mp.set_start_method("spawn")
    with mp.Pool(len(cfgs)) as p:
        for name, dt, acc in p.imap_unordered(run, cfgs):
            print(name, f"{dt:.0f}s", {s: {k: round(v, 3) for k, v in r.items()} for s, r in acc.items()}, flush=True)
