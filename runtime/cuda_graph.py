"""The one place CUDA graphs are captured: a step function captured once, replayed many times
(the engine's step; --tree auto's cost model times its candidate forwards the same way).

The step function must touch only static buffers (the engine's state) and run no host syncs.
AOTInductor packages are loaded with `run_single_threaded=True` (runtime/aoti.py): the default
runner guards each call with CUDA events (`cudaEventQuery`), which invalidates a stream capture
(`cudaErrorStreamCaptureInvalidated`); the single-threaded runner skips that machinery.
"""

from __future__ import annotations

from typing import Callable

import torch


class CapturedStep:
    """Warm `fn` up on a side stream, then capture it into one CUDA graph (in memory pool `pool`
    if given: graphs that never run at the same time can share one)."""

    def __init__(self, fn: Callable[[], None], warmup: int = 2, pool=None):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            fn()
        torch.cuda.synchronize()

    def __call__(self) -> None:
        self.graph.replay()
