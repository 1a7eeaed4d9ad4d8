"""PyTorch on a GPU, the baseline of `scripts/gpu-check.sh`, on weights it writes for univ.

For each full-size network of the CLIP-Driven Universal Model (U-Net base 32, Swin UNETR
feature size 48; the modules of `pytorch_window.py`, named after the official checkpoint keys)
it draws weights (seed 0) and a 96^3 input, writes them for univ (`weights_<net>.safetensors`
with the official key names, `input_<net>.safetensors`), and times one window in PyTorch eager
f32 with TF32 off (true f32, as univ's f32), eager f32 with PyTorch's defaults (cuDNN
convolutions in TF32), and bf16 autocast (AMP). It saves the f32 logits
(`torch_logits_<net>.safetensors`) and writes a JSON summary: best time of `--reps` after two
warm-ups, each with `torch.cuda.synchronize()`, peak memory (`torch.cuda.max_memory_allocated`
and the largest reserved), and AMP's logit error against f32.

    python3 docs/benchmarks/gpu_anchors.py --out /tmp/anchors [--device cuda] [--size 96]

It runs on a CPU too (`--device cpu --size 32`), to check the export here.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_window import SwinBackbone, UNet3D, Universal  # noqa: E402

# Buffers univ does not read: Swin's relative position indices, BatchNorm's running statistics
# (the official ContBatchNorm3d uses batch statistics), and SwinUNETR's unused output layer.
IGNORED = ("relative_position_index", "running_mean", "running_var", "num_batches_tracked",
           "backbone.net.out.")


def export(model, path):
    """Writes `model`'s weights under the official checkpoint keys that univ loads."""
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        if any(s in k for s in IGNORED):
            continue
        if isinstance(model.backbone, SwinBackbone):
            k = k.replace("backbone.net.", "backbone.", 1)
        state[k] = v.detach().float().cpu().contiguous()
    save_file(state, path)


def timed(fn, reps, dev):
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, y = [], None
    for _ in range(reps):
        t = time.perf_counter()
        y = fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if dev.type == "cuda" else None
    return {"best_s": min(times), "all_s": times, "peak_allocated_bytes": peak,
            "peak_reserved_bytes": reserved}, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["unet", "swin"])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device(a.device)
    from safetensors.torch import save_file

    nets = []
    if a.only in (None, "unet"):
        nets.append(("unet", lambda: Universal(UNet3D(32), 64, 512)))
    if a.only in (None, "swin"):
        nets.append(("swin", lambda: Universal(SwinBackbone(48), 48, 768)))
    summary = {"torch": torch.__version__, "device": str(dev), "size": a.size,
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None}
    for key, make in nets:
        torch.manual_seed(0)
        model = make().eval()
        x = torch.rand(1, 1, a.size, a.size, a.size)
        export(model, os.path.join(a.out, f"weights_{key}.safetensors"))
        save_file({"input": x}, os.path.join(a.out, f"input_{key}.safetensors"))
        model, xd = model.to(dev), x.to(dev)
        r = {}
        with torch.inference_mode():
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            r["f32"], ref = timed(lambda: model(xd), a.reps, dev)
            torch.backends.cudnn.allow_tf32 = True
            r["f32_tf32_default"], _ = timed(lambda: model(xd), a.reps, dev)
            torch.backends.cudnn.allow_tf32 = False

            def amp():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    return model(xd)

            r["amp_bf16"], y = timed(amp, a.reps, dev)
            ref = ref.float()
            y = y.float()
            r["amp_bf16"]["max_logit_error"] = (y - ref).abs().max().item()
            r["amp_bf16"]["mask_flip_share"] = ((y > 0) != (ref > 0)).float().mean().item()
        save_file({"logits": ref.cpu().contiguous()}, os.path.join(a.out, f"torch_logits_{key}.safetensors"))
        summary[key] = r
        del model, xd
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{key}: f32 {r['f32']['best_s']:.4f} s, f32 (TF32) {r['f32_tf32_default']['best_s']:.4f} s, "
              f"AMP bf16 {r['amp_bf16']['best_s']:.4f} s", flush=True)
    with open(os.path.join(a.out, "torch.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
