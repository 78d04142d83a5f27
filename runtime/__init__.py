"""Runtime: load prebuilt engines (no compilation) and generate.

    from spec_compiler.runtime import Engine
    engine = Engine.load("engine_dir")
    result = engine.generate(prompt_ids, max_new_tokens=64)
"""

from .generate import Engine, GenerationResult
from .loader import load

__all__ = ["Engine", "GenerationResult", "load"]
