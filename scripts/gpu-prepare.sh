#!/usr/bin/env bash
# Prepares `.gpu/` (ignored by git) for scripts/gpu-check.sh, on this machine, which needs no
# GPU: the `univ` binary built with the `cuda` feature by the pinned CUDA 13.0 toolchain
# (scripts/cuda-env.sh, link stand-ins from scripts/cuda-stubs.sh), stripped and compressed;
# the model fixtures and example_ct it checks against (from ../shared); and the MONAI wheel the
# PyTorch baseline needs (the GPU machine has PyTorch but no MONAI, and no network).
#
#   bash scripts/gpu-prepare.sh            # about 12 minutes on 2 cores from clean
# Then, on the GPU machine, with `.gpu` carried along:
#   bash scripts/gpu-check.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${UNIV_SHARED:-../shared}
[ -d "$shared/fixtures" ] || { echo "gpu-prepare: $shared/fixtures is missing (set UNIV_SHARED)" >&2; exit 1; }
# shellcheck source=cuda-env.sh
. scripts/cuda-env.sh
bash scripts/cuda-stubs.sh
target=${UNIV_CUDA_TARGET:-target/cuda}
CARGO_TARGET_DIR="$target" cargo build --release --locked -p univ --features cuda --bin univ
rm -rf .gpu
mkdir -p .gpu/fixtures/model_unet .gpu/fixtures/model_swin .gpu/data .gpu/whl
strip -o .gpu/univ "$target/release/univ"
gzip -9 .gpu/univ
for net in unet swin; do
    cp "$shared/fixtures/model_$net/"{model,input,expected}.safetensors .gpu/fixtures/model_$net/
done
cp "$shared/data/ct/example_ct.nii.gz" .gpu/data/
# The training case of (d): example_ct's labels in Universal Model ids, and the ids present.
cp "$shared/data/ct/derived_example_ct_seg_fast_um32.nii.gz" .gpu/data/example_ct_seg_um32.nii.gz
python3 - <<'PY'
import gzip, struct
b = gzip.open(".gpu/data/example_ct_seg_um32.nii.gz").read()
assert struct.unpack("<h", b[70:72])[0] == 2, "expected uint8 labels"
off = int(struct.unpack("<f", b[108:112])[0])
ids = sorted(set(b[off:]) - {0})
open(".gpu/data/example_ct_classes", "w").write(", ".join(map(str, ids)))
PY
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl monai==1.6.1
git rev-parse HEAD >.gpu/commit
du -sh .gpu
echo "gpu-prepare: .gpu ready for commit $(cat .gpu/commit); on the GPU machine: bash scripts/gpu-check.sh \"\$OUT\" (carry .gpu)"
