#!/usr/bin/env bash
# Builds link-time stand-ins for the CUDA libraries that candle's `cuda` feature links against
# (cudarc with `dynamic-linking`: libcuda, libnvrtc, libcurand, libcublas, libcublasLt; also
# libcudnn and libnccl; candle-kernels adds libcudart, linked to the wheel's real one), so
# that binaries and test binaries with the `cuda` feature link on a machine without CUDA's
# libraries or driver. Each stand-in is a shared object that exports,
# as empty functions, every symbol cudarc's bindings for that library declare, under the real
# library's SONAME: a binary linked against it records the real name (libcuda.so.1, ...) and
# loads the real library, found through the loader's path, on a GPU machine. The stand-ins
# must never be on a run-time library path (calling one does nothing useful).
#
# Use after `. scripts/cuda-env.sh` (it needs CUDA_ROOT): the stand-ins go to
# $CUDA_ROOT/lib/stubs, a folder cudarc's build script searches. Then, for example:
#   cargo test --workspace --release --features univ/cuda --no-run
set -euo pipefail
: "${CUDA_ROOT:?source scripts/cuda-env.sh first}"
cd "$(dirname "$0")/.."
dest="$CUDA_ROOT/lib/stubs"
cudarc=$(cargo metadata --format-version 1 --locked --features univ/cuda | python3 -c '
import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if not pkgs:
    sys.exit("cuda-stubs: cudarc is not in Cargo.lock")
print(os.path.dirname(pkgs[0]["manifest_path"]))
')
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# library name, SONAME of the CUDA 13 release (cuDNN 9, NCCL 2), cudarc's bindings module.
while read -r name soname module; do
    sys="$cudarc/src/$module/sys/mod.rs"
    [ -f "$sys" ] || { echo "cuda-stubs: $sys is missing" >&2; exit 1; }
    sed -n 's/^pub unsafe fn \([A-Za-z_][A-Za-z0-9_]*\)(.*/void \1(void) {}/p' "$sys" |
        sort -u >"$work/$name.c"
    count=$(wc -l <"$work/$name.c")
    [ "$count" -gt 0 ] || { echo "cuda-stubs: no functions found in $sys" >&2; exit 1; }
    gcc -shared -fPIC -o "$dest/$soname" -Wl,-soname,"$soname" "$work/$name.c"
    ln -sf "$soname" "$dest/lib$name.so"
    echo "cuda-stubs: $dest/$soname ($count symbols)" >&2
done <<'LIBS'
cuda libcuda.so.1 driver
nvrtc libnvrtc.so.13 nvrtc
curand libcurand.so.10 curand
cublas libcublas.so.13 cublas
cublasLt libcublasLt.so.13 cublaslt
cudnn libcudnn.so.9 cudnn
nccl libnccl.so.2 nccl
LIBS
# candle-kernels also links the CUDA runtime: the pinned nvidia-cuda-runtime wheel ships the real
# libcudart.so.13 without the unversioned name the linker looks for.
[ -f "$CUDA_ROOT/lib/libcudart.so.13" ] || { echo "cuda-stubs: $CUDA_ROOT/lib/libcudart.so.13 is missing" >&2; exit 1; }
ln -sf ../libcudart.so.13 "$dest/libcudart.so"
echo "cuda-stubs: $dest/libcudart.so -> the wheel's libcudart.so.13" >&2
