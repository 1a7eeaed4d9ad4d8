#!/usr/bin/env bash
# Fuzz one target (or all, one after the other) with libFuzzer under AddressSanitizer:
#     fuzz/run.sh TARGET [SECONDS]      # default 600 s
#     fuzz/run.sh all [SECONDS]
# Needs cargo-fuzz (`cargo install cargo-fuzz`), python3 with numpy and pydicom (for the seeds)
# and ../shared beside the repository for the real-file seeds. On a stable toolchain
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly flags. New corpus entries go to
# fuzz/corpus/TARGET (ignored by git); crashes, leaks, timeouts and out-of-memory inputs to
# fuzz/artifacts/TARGET: minimise one (`cargo fuzz tmin`), fix the reader, and commit the input
# as tests/fuzz/TARGET/finding-NAME so that the test suite replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz/run.sh TARGET|all [SECONDS]}
secs=${2:-600}
targets=(nifti nifti_gz dicom_file dicom_series pth safetensors npy train_toml label_map)
if [ "$target" = all ]; then
    for t in "${targets[@]}"; do "$0" "$t" "$secs"; done
    exit 0
fi
export RUSTC_BOOTSTRAP=1
mkdir -p "fuzz/corpus/$target"
if [ -d ../shared/data ]; then
    python3 fuzz/make_seeds.py shared fuzz/corpus
else
    echo "../shared/data not found: fuzzing from the crafted seeds only" >&2
fi
mkdir -p "fuzz/artifacts/$target"
export TMPDIR=${TMPDIR:-/dev/shm}
cargo fuzz run -O "$target" "fuzz/corpus/$target" "tests/fuzz/$target" -- \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=20 -max_total_time="$secs" \
    -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1
