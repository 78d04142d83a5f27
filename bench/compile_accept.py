"""Inductor's lowering time of the sampled acceptance for plain decoding in a speculating engine:
the root alone, its accepted path padded to the engine's W columns (measured dispatch's
`verify_sampled (plain)` graph ends in it). Walking only the tree's own levels (now: none) against
walking W - 1 levels over the root alone (before): the same outputs (checked here), and the
second made Inductor take minutes on a CPU and never finish the whole verify graph on an H200.

    python bench/compile_accept.py --out bench/results/compile_accept_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def lower_seconds(walk: int, width: int, vocab: int, device: str) -> tuple[float, tuple]:
    """(seconds for torch.compile's first call, its outputs, the eager outputs)."""
    import torch._dynamo

    from spec_compiler import sampling
    from spec_compiler.trees import TreeSpec

    tree = TreeSpec("root-alone", ())

    def epilogue(logits, temperature, top_k, top_p, tokens, children, depth, position, seed):
        probs = sampling.warp(logits, temperature, top_k, top_p)
        return sampling.tree_accept(tokens, probs, children, depth, position, seed, walk, width)

    g = torch.Generator().manual_seed(5)
    args = [t.to(device) for t in (torch.randn(1, 1, vocab, generator=g) * 4, torch.tensor([1.0]),
                                   torch.tensor([0]), torch.tensor([0.9]),
                                   torch.randint(0, vocab, (1, 1), generator=g), tree.children_table(),
                                   torch.as_tensor(tree.depth), torch.tensor([40]), torch.tensor([11]))]
    torch._dynamo.reset()
    t = time.time()
    got = torch.compile(epilogue, fullgraph=True, dynamic=False)(*args)
    seconds = time.time() - t
    return seconds, got, epilogue(*args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's by default")
    ap.add_argument("--width", type=int, default=6, help="the engine's accepted-path columns (D + 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/results/compile_accept_cpu.json"))
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # time the lowering, not a cache hit
    rows = []
    for walk, label in ((0, "the tree's own levels (now)"), (args.width - 1, "every column (before)")):
        s, got, want = lower_seconds(walk, args.width, args.vocab, args.device)
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        rows.append({"levels_walked": walk, "what": label, "compile_s": round(s, 1), "matches_eager": same})
        print(f"walk {walk} levels ({label}): {s:.1f} s, matches eager: {same}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "vocab": args.vocab, "width": args.width,
                                    "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print("levels walked | compile s | matches eager")
    for r in rows:
        print(f"{r['levels_walked']} ({r['what']}) | {r['compile_s']} | {r['matches_eager']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
