"""PyTorch + MONAI baseline of the whole segmentation pipeline, for comparison with
`univ segment` on the same CT (full-size U-Net with random weights, 32 classes).

Load (nibabel) -> MONAI preprocessing (Orientation RAS, Spacing 1.5 mm, ScaleIntensityRange,
CropForeground) -> sliding_window_inference(96^3, sw_batch 1, overlap 0.5, gaussian) ->
sigmoid > 0.5 -> Invertd-style mapping is left out (the official code writes per-class files).
Timing per stage and peak RSS are printed.

    /tmp/torchvenv/bin/python docs/benchmarks/pytorch_pipeline.py ../shared/data/ct/example_ct.nii.gz --threads 2
"""
import argparse
import resource
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from pytorch_window import UNet3D, Universal  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from monai.inferers import sliding_window_inference
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged,
                                  Orientationd, ScaleIntensityRanged, Spacingd)

    t0 = time.perf_counter()
    pre = Compose([
        LoadImaged(keys=["image"]),
        EnsureChannelFirstd(keys=["image"]),
        Orientationd(keys=["image"], axcodes="RAS"),
        Spacingd(keys=["image"], pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=["image"], source_key="image"),
    ])
    d = pre({"image": a.image})
    x = d["image"].unsqueeze(0).as_tensor() if hasattr(d["image"], "as_tensor") else d["image"].unsqueeze(0)
    t1 = time.perf_counter()
    torch.manual_seed(0)
    model = Universal(UNet3D(32), 64, 512).eval()
    with torch.inference_mode():
        logits = sliding_window_inference(x, (96, 96, 96), 1, model, overlap=0.5, mode="gaussian")
        masks = torch.sigmoid(logits) > 0.5
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"PyTorch {torch.__version__}: preprocessed {tuple(x.shape)} in {t1 - t0:.1f} s; "
          f"sliding window {t2 - t1:.1f} s; total {t2 - t0:.1f} s; peak RSS {rss:.2f} GB; "
          f"{int(masks.sum())} positive voxels")


if __name__ == "__main__":
    main()
