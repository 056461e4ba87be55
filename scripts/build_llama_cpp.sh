#!/usr/bin/env bash
# llama.cpp for GGUF export (studio/export/), built once into .venv and skipped when already there:
#   - llama-cpp-python 0.3.36's Python bindings, with only the libraries they load (libllama and ggml's CPU
#     backend), built from the llama.cpp sources vendored in its sdist;
#   - llama.cpp's converter (convert_hf_to_gguf.py, its conversion/ package and its own gguf-py) into
#     .venv/share/studio-llama.cpp, where studio/export/llamacpp.py looks for them.
# Why not a plain `pip install llama-cpp-python`: that also builds llama.cpp's common library and the multimodal
# (mtmd) library, which the bindings never need for this (11 minutes on 2 busy cores; this build skips them).
# Usage: bash scripts/build_llama_cpp.sh   (STUDIO_NO_GGUF=1 bash scripts/setup.sh skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PY=.venv/bin/python
TOOLS=.venv/share/studio-llama.cpp
if $PY -c "import llama_cpp" 2>/dev/null && [ -f "$TOOLS/convert_hf_to_gguf.py" ]; then
  exit 0
fi
# cmake and ninja come from PyPI when the machine lacks them; a C++ compiler from apt where we may install it.
export PATH="$PWD/.venv/bin:$PATH"
for tool in cmake ninja; do
  command -v "$tool" >/dev/null || $PY -m pip --disable-pip-version-check -q install "$tool" 2>&1 \
    | grep -v "^WARNING: Location" || true
done
if ! command -v c++ >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) || true
fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "setup: GGUF export needs $tool (apt-get install cmake g++)" >&2; exit 1; }
done
start=$(date +%s)
work=.venv/build/llama-cpp-python
rm -rf "$work" && mkdir -p "$work"
$PY -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" \
  2>&1 | grep -v "^WARNING: Location" || true
tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
src="$work/llama_cpp_python-$VERSION"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Only the llama library and what it links (ggml, ggml-base, ggml-cpu): no common library, tools, tests,
# examples, server or network code. $ORIGIN: the libraries find each other wherever they are copied.
cmake -S "$src/vendor/llama.cpp" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' >/dev/null
cmake --build "$work/build" --target llama -j "$(nproc 2>/dev/null || echo 2)" >/dev/null
# The bindings themselves, with no library build of their own; then the libraries beside them.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $PY -m pip --disable-pip-version-check -q install --no-deps \
  "$work/llama_cpp_python-$VERSION.tar.gz" 2>&1 | grep -v "^WARNING: Location" || true
$PY -m pip --disable-pip-version-check -q install "numpy>=1.20" "diskcache>=5.6.1" "typing-extensions>=4.5" \
  "jinja2>=2.11.3" sentencepiece 2>&1 | grep -v "^WARNING: Location" || true
lib=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$lib"
cp -a "$work/build/bin/"lib*.so* "$lib/" 2>/dev/null || cp -a "$work/build/bin/"lib*.dylib "$lib/"
# The converter as llama.cpp ships it, with the gguf-py it was written against.
rm -rf "$TOOLS" && mkdir -p "$TOOLS"
cp -r "$src/vendor/llama.cpp/convert_hf_to_gguf.py" "$src/vendor/llama.cpp/conversion" "$src/vendor/llama.cpp/gguf-py" \
  "$TOOLS/"
rm -rf "$work"
$PY -c "import llama_cpp; llama_cpp.llama_backend_init()" \
  || { echo "setup: llama-cpp-python did not load; GGUF export will be unavailable" >&2; exit 1; }
echo "setup: llama.cpp for GGUF export built in $(( $(date +%s) - start )) s"
