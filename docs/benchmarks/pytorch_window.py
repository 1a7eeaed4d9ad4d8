"""PyTorch baseline for `cargo run --release -p univ-model --example bench_window`.

One 96^3 window, forward without gradients, through the two full-size networks of the
CLIP-Driven Universal Model with random weights: a Models-Genesis-style UNet3D (base 32,
batch-statistics BatchNorm as the official ContBatchNorm3d) and MONAI's SwinUNETR (feature size
48), each followed by the text-driven head (GroupNorm/ReLU/1x1 conv, GAP, controller, grouped
8-8-1 dynamic head over 32 classes). Written from the architecture description in the
specification; it is a timing baseline, not a parity reference.

Run it from a throwaway virtualenv outside the repository:
    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.15.0 monai==1.6.1 numpy
    /tmp/torchvenv/bin/python docs/benchmarks/pytorch_window.py --threads 2
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LUConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(cout)

    def forward(self, x):
        y = self.conv1(x)
        y = F.batch_norm(y, None, None, self.bn1.weight, self.bn1.bias, True, 0.1, 1e-5)
        return F.relu(y)


def two(cin, mid, cout):
    return nn.Sequential(LUConv(cin, mid), LUConv(mid, cout))


class Up(nn.Module):
    def __init__(self, cin, skip, cout):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(cin, cin, 2, stride=2)
        self.ops = two(cin + skip, cout, cout)

    def forward(self, x, s):
        return self.ops(torch.cat([self.up_conv(x), s], 1))


class UNet3D(nn.Module):
    def __init__(self, b=32):
        super().__init__()
        self.d64, self.d128 = two(1, b, 2 * b), two(2 * b, 2 * b, 4 * b)
        self.d256, self.d512 = two(4 * b, 4 * b, 8 * b), two(8 * b, 8 * b, 16 * b)
        self.u256, self.u128 = Up(16 * b, 8 * b, 8 * b), Up(8 * b, 4 * b, 4 * b)
        self.u64 = Up(4 * b, 2 * b, 2 * b)

    def forward(self, x):
        s64 = self.d64(x)
        s128 = self.d128(F.max_pool3d(s64, 2))
        s256 = self.d256(F.max_pool3d(s128, 2))
        deep = self.d512(F.max_pool3d(s256, 2))
        u = self.u64(self.u128(self.u256(deep, s256), s128), s64)
        return deep, u


class SwinBackbone(nn.Module):
    def __init__(self, fs=48):
        super().__init__()
        from monai.networks.nets import SwinUNETR

        self.net = SwinUNETR(in_channels=1, out_channels=32, feature_size=fs)

    def forward(self, x):
        n = self.net
        hs = n.swinViT(x, n.normalize)
        enc0, enc1 = n.encoder1(x), n.encoder2(hs[0])
        enc2, enc3 = n.encoder3(hs[1]), n.encoder4(hs[2])
        dec4 = n.encoder10(hs[4])
        dec3 = n.decoder5(dec4, hs[3])
        dec2 = n.decoder4(dec3, enc3)
        dec1 = n.decoder3(dec2, enc2)
        dec0 = n.decoder2(dec1, enc1)
        return dec4, n.decoder1(dec0, enc0)


class Universal(nn.Module):
    def __init__(self, backbone, c_dec, c_deep, classes=32):
        super().__init__()
        self.backbone = backbone
        self.precls = nn.Sequential(nn.GroupNorm(16, c_dec), nn.ReLU(), nn.Conv3d(c_dec, 8, 1))
        self.gap = nn.Sequential(nn.GroupNorm(16, c_deep), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Conv3d(c_deep, 256, 1))
        self.controller = nn.Conv3d(512, 153, 1)
        self.register_buffer("emb", torch.randn(classes, 512))
        self.t2v = nn.Linear(512, 256)
        self.k = classes

    def forward(self, x):
        deep, dec = self.backbone(x)
        e = F.relu(self.t2v(self.emb)).unsqueeze(2).unsqueeze(2).unsqueeze(2)
        g = self.gap(deep)
        out = []
        for i in range(x.shape[0]):
            cond = torch.cat([g[i].unsqueeze(0).repeat(self.k, 1, 1, 1, 1), e], 1)
            p = self.controller(cond).squeeze(-1).squeeze(-1).squeeze(-1)
            w1, w2, w3, b1, b2, b3 = torch.split(p, [64, 64, 8, 8, 8, 1], 1)
            f = self.precls(dec[i].unsqueeze(0)).repeat(self.k, 1, 1, 1, 1)
            d, h, w = f.shape[2:]
            f = f.reshape(1, -1, d, h, w)
            f = F.relu(F.conv3d(f, w1.reshape(-1, 8, 1, 1, 1), b1.reshape(-1), groups=self.k))
            f = F.relu(F.conv3d(f, w2.reshape(-1, 8, 1, 1, 1), b2.reshape(-1), groups=self.k))
            f = F.conv3d(f, w3.reshape(-1, 8, 1, 1, 1), b3.reshape(-1), groups=self.k)
            out.append(f.reshape(1, self.k, d, h, w))
        return torch.cat(out, 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=["unet", "swin"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 1, a.size, a.size, a.size)
    models = []
    if a.only in (None, "unet"):
        models.append(("U-Net (base 32)", lambda: Universal(UNet3D(32), 64, 512)))
    if a.only in (None, "swin"):
        models.append(("Swin UNETR (fs 48)", lambda: Universal(SwinBackbone(48), 48, 768)))
    for name, make in models:
        m = make().eval()
        times = []
        with torch.inference_mode():
            for _ in range(a.reps):
                t = time.perf_counter()
                y = m(x)
                times.append(time.perf_counter() - t)
        print(f"PyTorch {torch.__version__} {name:<22} {a.size}^3 window: best {min(times):7.2f} s of {a.reps} (all: {[round(t, 2) for t in times]}); output {tuple(y.shape)}")


if __name__ == "__main__":
    main()
