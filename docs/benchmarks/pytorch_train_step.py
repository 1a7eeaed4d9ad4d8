"""PyTorch baseline for `cargo run --release -p univ-train --example bench_train_step`.

One training step (forward + backward + AdamW) on a 96^3 patch through the full-size U-Net
Universal Model of `pytorch_window.py` (32 classes), with the partial-label loss of the official
training (BCE-with-logits + per-slice soft Dice with smooth 1) over all 32 classes. Prints the
time of each step and the process's peak resident memory.

    /tmp/torchvenv/bin/python docs/benchmarks/pytorch_train_step.py --threads 2
"""
import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_window import UNet3D, Universal  # noqa: E402


def loss_fn(logits, target):
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    b, k, d, h, w = p.shape
    p = p.reshape(b * k, d, h * w)
    t = target.reshape(b * k, d, h * w)
    dice = 1 - 2 * (p * t).sum(2) / (p.sum(2) + t.sum(2) + 1)
    return bce + dice.mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = Universal(UNet3D(32), 64, 512).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.rand(1, 1, a.size, a.size, a.size)
    target = (torch.rand(1, 32, a.size, a.size, a.size) > 0.5).float()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(m(x), target)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"PyTorch {torch.__version__} U-Net (base 32) train step {a.size}^3: best {min(times):.2f} s "
          f"of {a.steps} (all: {[round(t, 2) for t in times]}); loss {loss.item():.4f}; peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
