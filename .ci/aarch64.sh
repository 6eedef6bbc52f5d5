#!/usr/bin/env bash
# Cross-build the mllama core for 64-bit ARM Linux (aarch64) and the C parity driver (tests/c/parity.c),
# for tests/test_aarch64.py to run under qemu-user and compare with the x86 build.
#
#   bash .ci/aarch64.sh && MLLAMA_REQUIRE_AARCH64=1 python -m pytest tests/test_aarch64.py
#
# Output: build/aarch64/parity with libmllama.so and the ggml libraries beside it (RUNPATH $ORIGIN).
# ggml is built from the pinned libggml-python sdist, downloaded here (nothing is cached between runs;
# no ggml source is kept in the repository). Needs Debian/Ubuntu's g++-aarch64-linux-gnu and
# qemu-user (installed with apt-get when missing), cmake, and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

GGML_PIN="libggml-python==0.20.2.post1"
OUT="$ROOT/build/aarch64"          # the result
WORK="$ROOT/build/aarch64-work"    # the sdist and the CMake build tree
JOBS=2
PYTHON=${PYTHON:-python3}

t_all=$SECONDS
t_stage=$SECONDS
stage() {  # stage NAME: report the time of the stage that just ended
    printf 'aarch64: %-28s %4ds\n' "$1" $((SECONDS - t_stage))
    t_stage=$SECONDS
}

# --- 1. toolchain: the aarch64 cross compilers and qemu-user --------------------------------------
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if ((${#missing[@]})); then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "aarch64: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cmake >/dev/null || { echo "aarch64: cmake is needed" >&2; exit 1; }
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
stage "toolchain"

# --- 2. ggml: the source tree of the pinned libggml-python sdist ------------------------------------
rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK/sdist"
# --no-binary only for libggml-python: `:all:` would also build its build requirements (cmake among
# them) from source just to read the sdist's metadata, which takes longer than the whole check.
"$PYTHON" -m pip download --quiet --no-deps --no-binary libggml-python "$GGML_PIN" -d "$WORK/sdist"
tarball=$(find "$WORK/sdist" -maxdepth 1 -name 'libggml_python-*.tar.gz' -print -quit)
[ -n "$tarball" ] || { echo "aarch64: no libggml-python sdist was downloaded" >&2; exit 1; }
tar -xzf "$tarball" -C "$WORK/sdist"
GGML_SRC=$(dirname "$(find "$WORK/sdist" -path '*/ggml/CMakeLists.txt' -not -path '*/src/*' -print -quit)")
[ -f "$GGML_SRC/include/ggml.h" ] || { echo "aarch64: no ggml source tree in $tarball" >&2; exit 1; }
echo "aarch64: ggml from $GGML_SRC"
stage "ggml sdist"

# --- 3. cross-build libmllama (and ggml) ---------------------------------------------------------------
# Like libggml-python's own wheels: no native tuning, no OpenMP, the CPU backend only (armv8-a + NEON).
cmake -S "$ROOT" -B "$WORK/cmake" "${GENERATOR[@]}" \
    -DCMAKE_TOOLCHAIN_FILE="$ROOT/.ci/aarch64-toolchain.cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DMLLAMA_BUILD_PYTHON=OFF \
    -DMLLAMA_GGML_SOURCE_DIR="$GGML_SRC" \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF \
    -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF \
    -Wno-dev >"$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log"; exit 1; }
stage "configure"
cmake --build "$WORK/cmake" --parallel "$JOBS" >"$WORK/build.log" 2>&1 || { tail -n 60 "$WORK/build.log"; exit 1; }
stage "build (ggml + libmllama)"
# install: libmllama and the ggml libraries together, with RUNPATH $ORIGIN
cmake --install "$WORK/cmake" --prefix "$WORK/stage" >/dev/null
cp -P "$WORK/stage/mllama/"*.so* "$OUT/"

# --- 4. the parity driver, for aarch64 -------------------------------------------------------------------
aarch64-linux-gnu-gcc -std=c99 -pedantic -Wall -Wextra -Werror -O2 \
    "$ROOT/tests/c/parity.c" -I"$ROOT/csrc/include" -L"$OUT" -lmllama -Wl,-rpath,'$ORIGIN' \
    -o "$OUT/parity"
# smoke: it starts under qemu and finds its libraries (usage error, exit 2)
rc=0
qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/parity" >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] || { echo "aarch64: the driver does not start under qemu (exit $rc)" >&2;
                     qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/parity" || true; exit 1; }
stage "driver"

ls -l "$OUT"
file "$OUT/parity" "$OUT/libmllama.so" 2>/dev/null || true
printf 'aarch64: %-28s %4ds\n' "total" $((SECONDS - t_all))
