#!/usr/bin/env bash
# Optional: llama.cpp (llama-cpp-python) as a peer in `quanttree bench` (rows llama_cpp and
# llama_cpp_lookup). Never needed by quanttree itself or by CI.
#   bash scripts/install_llama_cpp.sh
# The first run compiles llama.cpp (12-15 minutes on 2 cores) into a wheel kept under
# ~/.cache/quanttree/wheels (QUANTTREE_WHEELS overrides); later runs install that wheel in seconds.
# The portable build: the native build crashes on these machines at the first decode (an
# AVX-512/AMX path in libggml-cpu); AVX2 + FMA + F16C runs everywhere x86-64 v3 does. The bench
# notes say which build ran (llama_print_system_info).
set -euo pipefail
VERSION=0.3.36
WHEELS="${QUANTTREE_WHEELS:-$HOME/.cache/quanttree/wheels}"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "compiling llama.cpp $VERSION (12-15 minutes on 2 cores) into $WHEELS ..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
    python3 -m pip wheel --disable-pip-version-check -q --no-cache-dir --no-deps -w "$WHEELS" \
    "llama-cpp-python==$VERSION"
fi
python3 -m pip install --disable-pip-version-check -q --find-links "$WHEELS" "llama-cpp-python==$VERSION"
python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
