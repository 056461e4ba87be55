"""llama.cpp's own tools, as set-up installs them: the converter (convert_hf_to_gguf.py with its `conversion`
package and its own copy of gguf-py, taken from the llama-cpp-python sdist) and the llama-cpp-python bindings,
whose library holds the quantiser (llama_model_quantize) and loads GGUF files back for the check.

The converter runs as a program of its own, as its authors run it; it reads the vendored gguf-py first, so the
gguf package installed beside the studio never has to match its version.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from studio.errors import StudioError

LLAMA_CPP_PYTHON = "0.3.36"
SETUP_COMMAND = "bash scripts/setup.sh  (builds llama-cpp-python once, about 10-20 minutes on 2 CPU cores)"
# llama.h's file types for the quantiser (enum llama_ftype)
QUANT_TYPES = {"q4_k_m": 15, "q8_0": 7}


def tools_dir() -> Path:
    """Where set-up unpacked llama.cpp's conversion scripts (inside the virtual environment)."""
    override = os.environ.get("STUDIO_LLAMA_CPP_TOOLS")
    return Path(override) if override else Path(sys.prefix) / "share" / "studio-llama.cpp"


def converter() -> Path:
    return tools_dir() / "convert_hf_to_gguf.py"


def missing() -> str | None:
    """What GGUF export lacks here, with what to run; None when everything is in place."""
    lacking = []
    if not converter().is_file():
        lacking.append(f"llama.cpp's converter (expected at {converter()})")
    import importlib.util
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            lacking.append("the llama-cpp-python bindings")
    except ValueError:
        lacking.append("the llama-cpp-python bindings")
    if importlib.util.find_spec("sentencepiece") is None:
        lacking.append("the sentencepiece package (the converter imports it)")
    if not lacking:
        return None
    return f"GGUF export needs {' and '.join(lacking)}, which are not installed. Run: {SETUP_COMMAND}"


def require() -> None:
    problem = missing()
    if problem:
        raise StudioError(problem)


def _run(command: list[str], what: str, seconds: float | None) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds, cwd=tools_dir())
    except subprocess.TimeoutExpired:
        raise StudioError(f"{what} took more than {seconds:.0f} s, the limit here, and was stopped.") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise StudioError(f"{what} failed (exit {done.returncode}):\n{tail}")


def convert(model_dir: Path, outtype: str, out: Path, seconds: float | None = None) -> Path:
    """A transformers folder to one GGUF file of `outtype` (f16, bf16, q8_0, f32) with llama.cpp's converter."""
    require()
    _run([sys.executable, str(converter()), str(model_dir), "--outtype", outtype, "--outfile", str(out)],
         "llama.cpp's converter", seconds)
    return out


def set_end_tokens(src: Path, out: Path, eos_id: int, eot_id: int | None, seconds: float | None = None) -> Path:
    """Rewrite `src` with these end-of-sequence and end-of-turn ids (eot None: remove it), through gguf-py's own
    gguf_new_metadata.py. The converter takes the end-of-sequence token from the tokenizer's config, which is not
    always the token a chat template closes a turn with; runtimes stop at the ids written here."""
    script = tools_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    command = [sys.executable, str(script), str(src), str(out), "--force", "--special-token-by-id", "eos", str(eos_id)]
    if eot_id is None:
        command += ["--remove-metadata", "tokenizer.ggml.eot_token_id"]
    else:
        command += ["--special-token-by-id", "eot", str(eot_id)]
    _run(command, "gguf-py's metadata writer", seconds)
    return out


def quantize(src: Path, out: Path, kind: str, threads: int | None = None) -> Path:
    """`src` (an f16 GGUF) to `kind` with llama.cpp's quantiser, through the bindings' llama_model_quantize."""
    require()
    import llama_cpp
    from llama_cpp._logger import set_verbose
    set_verbose(False)  # llama.cpp logs a line per tensor (and per fallback type); errors still show
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = threads or max(1, (os.cpu_count() or 2))
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), llama_cpp.byref(params))
    if code != 0 or not out.is_file():
        raise StudioError(f"llama.cpp's quantiser could not write {kind} (code {code}).")
    return out


def read_metadata(path: Path) -> dict:
    """The GGUF's key-value metadata (no tensors read), through the vendored gguf-py."""
    sys.path.insert(0, str(tools_dir() / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    reader = gguf.GGUFReader(str(path), "r")
    found = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        try:
            found[key] = field.contents()
        except Exception:  # noqa: BLE001 - an odd field type is not what anyone reads here
            continue
    return found
