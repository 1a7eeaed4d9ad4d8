"""PyTorch baseline for `cargo run --release -p univ-model --example bench_window`.

One 96^3 window, forward without gradients, through the two full-size networks of the
CLIP-Driven Universal Model with random weights: a Models-Genesis-style UNet3D (base 32,
batch-statistics BatchNorm as the official ContBatchNorm3d) and MONAI's SwinUNETR (feature size
48), each followed by the text-driven head (GroupNorm/ReLU/1x1 conv, GAP, controller, grouped
8-8-1 dynamic head over 32 classes). Written from the architecture description in the
specification; it is a timing baseline, not a parity reference. The modules are named after the
official checkpoint keys, so that `cpu_anchors.py` can load univ's random weights into them; the
U-Net's ContBatchNorm3d (batch statistics) is instance norm with the same affine weights, which
for batch 1 is the same arithmetic.

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
        # ContBatchNorm3d uses batch statistics; for batch 1 that is instance norm.
        y = F.instance_norm(y, weight=self.bn1.weight, bias=self.bn1.bias, eps=1e-5)
        return F.relu(y)


class Stage(nn.Module):
    def __init__(self, cin, mid, cout, up=None):
        super().__init__()
        if up is not None:
            self.up_conv = nn.ConvTranspose3d(up, up, 2, stride=2)
        self.ops = nn.Sequential(LUConv(cin, mid), LUConv(mid, cout))


class UNet3D(nn.Module):
    def __init__(self, b=32):
        super().__init__()
        self.down_tr64 = Stage(1, b, 2 * b)
        self.down_tr128 = Stage(2 * b, 2 * b, 4 * b)
        self.down_tr256 = Stage(4 * b, 4 * b, 8 * b)
        self.down_tr512 = Stage(8 * b, 8 * b, 16 * b)
        self.up_tr256 = Stage(24 * b, 8 * b, 8 * b, up=16 * b)
        self.up_tr128 = Stage(12 * b, 4 * b, 4 * b, up=8 * b)
        self.up_tr64 = Stage(6 * b, 2 * b, 2 * b, up=4 * b)

    def forward(self, x):
        s64 = self.down_tr64.ops(x)
        s128 = self.down_tr128.ops(F.max_pool3d(s64, 2))
        s256 = self.down_tr256.ops(F.max_pool3d(s128, 2))
        deep = self.down_tr512.ops(F.max_pool3d(s256, 2))
        u = deep
        for stage, skip in ((self.up_tr256, s256), (self.up_tr128, s128), (self.up_tr64, s64)):
            u = stage.ops(torch.cat([stage.up_conv(u), skip], 1))
        return deep, u


def legacy_patch_merging():
    """MONAI 0.9.0's patch merging, which the official checkpoints were trained with: the eight
    strided sub-volumes concatenated in the order (000, 100, 010, 001, 101, 010, 001, 111) over
    (D, H, W), two of them twice and (110, 011) never (MONAI >= 1.0's "merging" uses all eight
    and changes the logits). Norm and reduction as MONAI's own module."""
    from monai.networks.nets.swin_unetr import PatchMergingV2

    class LegacyPatchMerging(PatchMergingV2):
        def forward(self, x):
            d, h, w = x.shape[1:4]
            if d % 2 or h % 2 or w % 2:
                x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
            order = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
            parts = [x[:, a::2, b::2, c::2, :] for a, b, c in order]
            return self.reduction(self.norm(torch.cat(parts, -1)))

    return LegacyPatchMerging


class SwinBackbone(nn.Module):
    """MONAI's SwinUNETR with the legacy patch merging of the official model, as a backbone."""

    def __init__(self, fs=48):
        super().__init__()
        from monai.networks.nets import SwinUNETR

        self.net = SwinUNETR(in_channels=1, out_channels=32, feature_size=fs,
                             downsample=legacy_patch_merging())

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
        self.precls_conv = nn.Sequential(nn.GroupNorm(16, c_dec), nn.ReLU(), nn.Conv3d(c_dec, 8, 1))
        self.GAP = nn.Sequential(nn.GroupNorm(16, c_deep), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                                 nn.Conv3d(c_deep, 256, 1))
        self.controller = nn.Conv3d(512, 153, 1)
        self.text_to_vision = nn.Linear(512, 256)
        self.organ_embedding = nn.Parameter(torch.randn(classes, 512))
        self.k = classes

    def forward(self, x):
        deep, dec = self.backbone(x)
        e = F.relu(self.text_to_vision(self.organ_embedding))[:, :, None, None, None]
        g = self.GAP(deep)
        out = []
        for i in range(x.shape[0]):
            cond = torch.cat([g[i : i + 1].repeat(self.k, 1, 1, 1, 1), e], 1)
            p = self.controller(cond).flatten(1)
            w1, w2, w3, b1, b2, b3 = torch.split(p, [64, 64, 8, 8, 8, 1], 1)
            f = self.precls_conv(dec[i : i + 1]).repeat(self.k, 1, 1, 1, 1)
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
