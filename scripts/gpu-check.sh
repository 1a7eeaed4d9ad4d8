#!/usr/bin/env bash
# The device check of the `cuda` feature, for a GPU machine with no network and nothing of
# ours installed (it builds nothing): run scripts/gpu-prepare.sh here first, carry `.gpu`, then
#   bash scripts/gpu-check.sh OUT          # about 4 minutes on an H200
# It writes OUT/summary.json (and the logs and timings behind it):
#   (a) `univ forward --device cuda` on the U-Net and Swin UNETR fixtures against their expected
#       logits (tolerance 2e-3 abs + 1e-3 rel), in f32; bf16's error reported;
#   (b) `univ segment --device cuda` on example_ct against `--device cpu` with the same binary
#       and model (the fixture U-Net): masks must agree wherever |logit| >= 1e-3;
#   (c) one 96^3 window of the full-size U-Net and Swin UNETR in univ (f32, bf16) against
#       PyTorch eager f32 (TF32 off, and PyTorch's defaults) and AMP bf16 on the same weights
#       (docs/benchmarks/gpu_anchors.py), and the whole example_ct with the full-size U-Net;
#   (e) peak GPU memory of each univ run (nvidia-smi, sampled every 20 ms, less the idle use)
#       and PyTorch's own peak.
#   (d) `univ train --device cuda`: three steps of the fixture U-Net on example_ct against
#       the same steps on the CPU (losses), as rank 0 of a one-process NCCL run (losses equal
#       to the plain CUDA run), and six steps of the full-size U-Net (seconds per step);
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT}
mkdir -p "$out"
g=.gpu
[ -f "$g/univ.gz" ] || { echo "gpu-check: $g/univ.gz is missing: run scripts/gpu-prepare.sh and carry .gpu" >&2; exit 1; }
exec > >(tee "$out/log.txt") 2>&1
echo "gpu-check: commit $(cat "$g/commit" 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# The CUDA libraries of PyTorch's wheels (cuBLAS, cuRAND, cuDNN 9, the runtime) and the driver.
libs=$(python3 - <<'PY'
import glob, os
import nvidia
dirs = set()
for root in nvidia.__path__:
    for lib in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
univ=/tmp/univ-gpu
gzip -dc "$g/univ.gz" >"$univ" && chmod +x "$univ"
if ldd "$univ" | grep "not found"; then
    echo "gpu-check: libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"; exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$g"/whl/*.whl \
    && export PYTHONPATH=/tmp/site

# Runs a univ command while sampling the GPU's memory use; NAME.mem holds the peak in MiB
# above the idle use, NAME.log the output, NAME.wall the wall time in seconds.
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
run() {
    local name=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"$out/$name.smi" &
    local smi=$!
    local t0; t0=$(date +%s.%N)
    "$univ" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", b - a }' >"$out/$name.wall"
    kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
    sort -n "$out/$name.smi" | tail -1 | awk -v i="$idle" '{ print $1 - i }' >"$out/$name.mem"
    echo "$name: rc $rc, $(cat "$out/$name.wall") s, peak $(cat "$out/$name.mem") MiB above idle; $(tail -1 "$out/$name.log")"
    return $rc
}

# (a) the fixtures
for net in unet swin; do
    f=$g/fixtures/model_$net
    for p in f32 bf16; do
        run "a_${net}_$p" forward --checkpoint "$f/model.safetensors" --input "$f/input.safetensors" \
            --output "$out/a_${net}_$p.safetensors" --device cuda --precision "$p" --reps 3 \
            --timings "$out/a_${net}_$p.json"
    done
done

# (b) example_ct, GPU against CPU, the fixture U-Net
for d in cuda cpu; do
    run "b_$d" segment "$g/data/example_ct.nii.gz" -o "$out/b_$d" --checkpoint "$g/fixtures/model_unet/model.safetensors" \
        --device "$d" --save-logits --quiet --overwrite
done

# (c) the full-size networks: PyTorch, then univ on the same weights
anchors=/tmp/anchors
PYTHONUNBUFFERED=1 python3 docs/benchmarks/gpu_anchors.py --out "$anchors" --device cuda --reps 5
cp "$anchors/torch.json" "$out/torch.json" 2>/dev/null
for net in unet swin; do
    for p in f32 bf16; do
        run "c_${net}_$p" forward --checkpoint "$anchors/weights_$net.safetensors" --input "$anchors/input_$net.safetensors" \
            --output "/tmp/c_${net}_$p.safetensors" --device cuda --precision "$p" --reps 5 \
            --timings "$out/c_${net}_$p.json"
    done
done
for p in f32 bf16; do
    run "c_pipeline_$p" segment "$g/data/example_ct.nii.gz" -o "/tmp/c_pipeline_$p" \
        --checkpoint "$anchors/weights_unet.safetensors" --device cuda --precision "$p" --quiet --overwrite
done

# (d) training on the GPU: three steps of the fixture U-Net (width 8, initialised from its
# weights, so every run starts equal) on example_ct against the CPU, once more as rank 0 of a
# one-process NCCL run, and steps of the full-size U-Net (width 32, fresh) for the speed.
d=/tmp/d
mkdir -p "$d"
classes=$(cat "$g/data/example_ct_classes")
cat >"$d/data.toml" <<TOML
[[dataset]]
name = "example"
cases = [["$PWD/$g/data/example_ct.nii.gz", "$PWD/$g/data/example_ct_seg_um32.nii.gz"]]
classes = [$classes]
TOML
train_cfg() { # NAME WIDTH INIT STEPS
    local init=""
    [ -n "$3" ] && init="init = \"$PWD/$3\""
    cat >"$d/$1.toml" <<TOML
[model]
backbone = "unet"
width = $2
classes = 32
$init

[data]
manifest = "data.toml"
roi = [96, 96, 96]

[train]
output = "run_$1"
steps = $4
checkpoint_every = $4
schedule_unit = "step"
seed = 7
TOML
}
for r in cpu cuda nccl; do train_cfg "$r" 8 "$g/fixtures/model_unet/model.safetensors" "${DSTEPS:-3}"; done
train_cfg full 32 "" "${DFULL:-6}"
run d_cpu train --config "$d/cpu.toml" --device cpu --quiet
run d_cuda train --config "$d/cuda.toml" --device cuda --quiet
WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
    run d_nccl train --config "$d/nccl.toml" --device cuda
run d_full train --config "$d/full.toml" --device cuda --quiet
for r in cpu cuda nccl full; do cp "$d/run_$r/log.csv" "$out/d_$r.csv" 2>/dev/null; done

OUT_DIR=$out ANCHORS=$anchors python3 - <<'PY'
import glob, json, os
import numpy as np
from safetensors.numpy import load_file

out, anchors = os.environ["OUT_DIR"], os.environ["ANCHORS"]
s = {"commit": open(".gpu/commit").read().strip() if os.path.exists(".gpu/commit") else None}

def num(path, cast=float):
    try:
        return cast(open(path).read().strip())
    except (OSError, ValueError):
        return None

def runinfo(name):
    r = {"wall_s": num(f"{out}/{name}.wall"), "gpu_peak_mib_above_idle": num(f"{out}/{name}.mem")}
    if os.path.exists(f"{out}/{name}.json"):
        r.update(json.load(open(f"{out}/{name}.json")))
    return r

def close(a, e, atol=2e-3, rtol=1e-3):
    d = np.abs(a - e)
    return {"max_abs_diff": float(d.max()), "within_tolerance": bool((d <= atol + rtol * np.abs(e)).all())}

# (a)
s["a"] = {}
for net in ("unet", "swin"):
    exp = load_file(f".gpu/fixtures/model_{net}/expected.safetensors")
    for p in ("f32", "bf16"):
        key = f"{net}_{p}"
        r = runinfo(f"a_{key}")
        try:
            y = load_file(f"{out}/a_{key}.safetensors")["logits"]
            if net == "unet":
                e = exp["logits"]
            else:
                i = exp["idx"]
                y = y[:, :, i][:, :, :, i][:, :, :, :, i]
                e = exp["logits_sub"]
            r.update(close(y, e))
        except Exception as ex:  # noqa: BLE001
            r["error"] = str(ex)
        s["a"][key] = r

# (b)
try:
    lg = load_file(glob.glob(f"{out}/b_cuda/**/logits.safetensors", recursive=True)[0])
    lc = load_file(glob.glob(f"{out}/b_cpu/**/logits.safetensors", recursive=True)[0])
    k = next(iter(lc))
    g, c = lg[k], lc[k]
    sure = np.abs(c) >= 1e-3
    s["b"] = {"gpu": runinfo("b_cuda"), "cpu": runinfo("b_cpu"), "max_abs_logit_diff": float(np.abs(g - c).max()),
              "mask_disagreements_where_abs_logit_ge_1e-3": int(((g > 0) != (c > 0))[sure].sum()),
              "voxels": int(c.size)}
except Exception as ex:  # noqa: BLE001
    s["b"] = {"error": str(ex)}

# (c), (e)
s["torch"] = json.load(open(f"{anchors}/torch.json")) if os.path.exists(f"{anchors}/torch.json") else None
s["c"] = {}
for net in ("unet", "swin"):
    for p in ("f32", "bf16"):
        key = f"{net}_{p}"
        r = runinfo(f"c_{key}")
        try:
            y = load_file(f"/tmp/c_{key}.safetensors")["logits"]
            ref = load_file(f"{anchors}/torch_logits_{net}.safetensors")["logits"]
            r["max_abs_diff_vs_torch_f32"] = float(np.abs(y - ref).max())
            r["mask_flip_share_vs_torch_f32"] = float(((y > 0) != (ref > 0)).mean())
            t = s["torch"][net]
            r["ratio_to_torch_f32"] = r["best_s"] / t["f32"]["best_s"]
            r["ratio_to_torch_amp_bf16"] = r["best_s"] / t["amp_bf16"]["best_s"]
        except Exception as ex:  # noqa: BLE001
            r["error"] = str(ex)
        s["c"][key] = r
    for p in ("f32", "bf16"):
        s["c"][f"pipeline_{p}"] = runinfo(f"c_pipeline_{p}")

# (d)
def log(name):
    rows = [l.strip().split(",") for l in open(f"{out}/d_{name}.csv")][1:]
    return [float(r[3]) for r in rows], [float(r[6]) for r in rows]

s["d"] = {}
try:
    (lc, tc), (lg, tg), (ln, _), (_, tf) = (log(n) for n in ("cpu", "cuda", "nccl", "full"))
    s["d"] = {
        "losses_cpu": lc, "losses_cuda": lg, "losses_nccl": ln,
        "max_rel_loss_diff_cuda_vs_cpu": max(abs(a - b) / abs(b) for a, b in zip(lg, lc)),
        "max_abs_loss_diff_nccl_vs_cuda": max(abs(a - b) for a, b in zip(ln, lg)),
        "steps_compared": min(len(lc), len(lg), len(ln)),
        "s_per_step_width8_cpu": tc, "s_per_step_width8_cuda": tg,
        "s_per_step_full_unet_cuda": tf,
        "runs": {n: runinfo(f"d_{n}") for n in ("cpu", "cuda", "nccl", "full")},
    }
except Exception as ex:  # noqa: BLE001
    s["d"]["error"] = str(ex)
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(s, indent=1))
PY
