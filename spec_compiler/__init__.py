"""spec-compiler: Llama + EAGLE draft -> FX passes -> Inductor engine -> speculative decoding."""

__version__ = "0.1.0"
