# Source this file (`. scripts/cuda-env.sh`) to build the `cuda` feature without a CUDA toolkit:
# CUDA's compiler comes from PyPI's wheels, all pinned to one 13.0 release (pip would otherwise
# mix in nvvm 13.5, whose PTX the 13.0 ptxas refuses: "Unsupported .version 9.5"). 13.0 is what
# the project's GPU machines run (NVIDIA H200, driver 580), so PTX built here loads there.
#
# It installs the wheels into a virtual environment outside the repository when missing
# ($UNIV_CUDA_VENV, default ~/.cache/univ/cuda-13.0) and exports PATH (nvcc), CUDA_ROOT,
# CUDA_PATH and CUDA_COMPUTE_CAP (default 90, the H100/H200; set it before sourcing to change).
# Then: cargo clippy --workspace --features cuda --release -- -D warnings
_univ_cuda_venv=${UNIV_CUDA_VENV:-$HOME/.cache/univ/cuda-13.0}
_univ_cuda_pins="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88"
if [ ! -x "$_univ_cuda_venv/bin/python" ]; then
    python3 -m venv "$_univ_cuda_venv" || return 1 2>/dev/null || exit 1
fi
_univ_cuda_root=$("$_univ_cuda_venv/bin/python" - <<'PY'
import pathlib, sysconfig
print(pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13")
PY
)
if [ ! -x "$_univ_cuda_root/bin/nvcc" ]; then
    echo "cuda-env: installing $_univ_cuda_pins into $_univ_cuda_venv" >&2
    # shellcheck disable=SC2086
    "$_univ_cuda_venv/bin/pip" install -q --disable-pip-version-check $_univ_cuda_pins \
        || return 1 2>/dev/null || exit 1
fi
export CUDA_ROOT="$_univ_cuda_root"
export CUDA_PATH="$_univ_cuda_root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export PATH="$_univ_cuda_root/bin:$PATH"
echo "cuda-env: nvcc $("$_univ_cuda_root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $_univ_cuda_root, compute capability $CUDA_COMPUTE_CAP" >&2
unset _univ_cuda_venv _univ_cuda_pins _univ_cuda_root
