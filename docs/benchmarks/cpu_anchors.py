"""The CPU engines univ is measured against, on the very weights and input of `bench_window`.

One 96^3 window through the full-size networks of the CLIP-Driven Universal Model (U-Net base 32,
Swin UNETR feature size 48, 32 classes, the text-driven head): PyTorch eager in f32, PyTorch with
bf16 autocast, OpenVINO in f32 and with the bf16 inference-precision hint (2 inference threads,
1 stream, latency hint). For each bf16 run it prints the largest logit difference from the same
engine's f32 logits and the share of voxels whose mask (logit > 0) flips, as `bench_window
--precision bf16` does for univ; and it checks that PyTorch f32 reproduces univ's f32 logits on
the shared weights (so that all engines compute the same function).

The networks are those of `pytorch_window.py`, whose modules are named after the official
checkpoint keys (`backbone.down_tr64.ops.0.conv1`, `precls_conv.2`, `GAP.3`, `controller`,
`text_to_vision`, `organ_embedding`, and MONAI's SwinUNETR under `backbone.net.`); the U-Net's
batch-statistics norm is written as instance norm, which exports to OpenVINO.

Make the weights, input and univ's logits, then run this from a throwaway virtualenv:

    UNIV_SAVE_RANDOM_MODELS=/tmp/rm cargo run --release -p univ-model --example bench_window -- --reps 1
    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.15.0 monai==1.6.1 einops openvino numpy safetensors
    /tmp/torchvenv/bin/python docs/benchmarks/cpu_anchors.py --weights /tmp/rm --threads 2
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_window import SwinBackbone, UNet3D, Universal  # noqa: E402


def load_univ_weights(model, path):
    """Loads a bench_window safetensors file (official key names) into `model`."""
    from safetensors.torch import load_file

    state = load_file(path)
    if isinstance(model.backbone, SwinBackbone):
        state = {k.replace("backbone.", "backbone.net.", 1): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers the file does not carry (relative position indices, BN running statistics
    # and counters, which instance norm does not use) and the unused Swin output layer.
    ignorable = ("relative_position_index", "running_mean", "running_var", "num_batches_tracked",
                 "backbone.net.out.")
    missing = [k for k in missing if not any(s in k for s in ignorable)]
    if missing or unexpected:
        raise SystemExit(f"{path}: missing {missing[:5]}..., unexpected {unexpected[:5]}...")


def best_time(fn, reps):
    times, y = [], None
    for _ in range(reps):
        t = time.perf_counter()
        y = fn()
        times.append(time.perf_counter() - t)
    return min(times), times, y


def compare(name, y, ref):
    err = (y.float() - ref).abs().max().item()
    flips = ((y.float() > 0) != (ref > 0)).float().mean().item() * 100
    return f"{name} against f32: max logit error {err:.4f} (largest |logit| {ref.abs().max().item():.2f}); masks flipped at {flips:.4f}% of {ref.numel()} voxels"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", help="folder written by bench_window with UNIV_SAVE_RANDOM_MODELS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=["unet", "swin"])
    ap.add_argument("--skip-openvino", action="store_true")
    ap.add_argument("--skip-torch-bf16", action="store_true",
                    help="skip PyTorch's bf16 autocast (on CPUs without bf16 instructions it runs "
                         "reference kernels: more than 15 minutes for the U-Net window on a 2-core EPYC)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    nets = []
    if a.only in (None, "unet"):
        nets.append(("U-Net (base 32)", "unet", lambda: Universal(UNet3D(32), 64, 512)))
    if a.only in (None, "swin"):
        nets.append(("Swin UNETR (fs 48)", "swinunetr", lambda: Universal(SwinBackbone(48), 48, 768)))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    print(f"cpu: {cpu} (amx_bf16: {'amx_bf16' in flags}, avx512_bf16: {'avx512_bf16' in flags}); "
          f"PyTorch {torch.__version__}, {a.threads} threads")
    from safetensors.torch import load_file

    for title, key, make in nets:
        model = make().eval()
        if a.weights:
            load_univ_weights(model, os.path.join(a.weights, f"random_{key}.safetensors"))
            x = load_file(os.path.join(a.weights, f"input_{key}_{a.size}.safetensors"))["input"]
        else:
            x = torch.rand(1, 1, a.size, a.size, a.size)
        with torch.inference_mode():
            t, ts, ref = best_time(lambda: model(x), a.reps)
            print(f"PyTorch f32            {title:<20} best {t:7.2f} s of {a.reps} (all: {[round(v, 2) for v in ts]})")
            if a.weights:
                univ = load_file(os.path.join(a.weights, f"logits_{key}_{a.size}.safetensors"))["logits"]
                print(f"  univ f32 logits against PyTorch f32: max difference {(univ - ref).abs().max().item():.2e}")

            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)

            if not a.skip_torch_bf16:
                t, ts, y = best_time(bf16, a.reps)
                print(f"PyTorch bf16 autocast  {title:<20} best {t:7.2f} s of {a.reps} (all: {[round(v, 2) for v in ts]})")
                print("  " + compare("PyTorch bf16", y, ref))
        if a.skip_openvino:
            continue
        try:
            import openvino as ov
        except ImportError:
            print("OpenVINO: not installed")
            continue
        try:
            ov_model = ov.convert_model(model, example_input=x)
        except Exception as e:  # noqa: BLE001 - report the engine's failure and go on
            print(f"OpenVINO {ov.__version__} {title}: conversion failed: {str(e).splitlines()[0]}")
            continue
        core = ov.Core()
        for precision in ("f32", "bf16"):
            cfg = {"INFERENCE_NUM_THREADS": a.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                   "INFERENCE_PRECISION_HINT": precision}
            try:
                compiled = core.compile_model(ov_model, "CPU", cfg)
                used = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
                t, ts, y = best_time(lambda: compiled(x.numpy())[0], a.reps)
            except Exception as e:  # noqa: BLE001
                print(f"OpenVINO {ov.__version__} {precision} {title}: failed: {str(e).splitlines()[0]}")
                continue
            ran_bf16 = "bf16" in used.lower() or "bfloat16" in used.lower()
            note = "" if ran_bf16 == (precision == "bf16") else f" (the plugin ran {used}: this CPU has no bf16)"
            print(f"OpenVINO {precision:<4}          {title:<20} best {t:7.2f} s of {a.reps} (all: {[round(v, 2) for v in ts]}){note}")
            y = torch.from_numpy(y)
            if precision == "f32":
                print(f"  OpenVINO f32 against PyTorch f32: max difference {(y - ref).abs().max().item():.2e}")
            else:
                print("  " + compare("OpenVINO bf16", y, ref))


if __name__ == "__main__":
    main()
