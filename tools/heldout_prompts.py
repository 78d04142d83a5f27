"""The prompts a corpus-trained draft never saw: `spec_compiler/data/prompts_fit_wide.jsonl`.

`spec-train --corpus` holds out every sequence of a hash-picked share of the corpus's prompts
(`--val-frac`, default 0.05) for validation; the drafts trained from the wide corpus saw none of
those prompts. They are the right prompts for fitting such a draft's acceptance table
(`spec-fit-tree --prompts`): the packaged `prompts_fit.jsonl` is part of the wide training set.
This writes the held-out rows of a prompt file, in file order, unchanged.

    python tools/heldout_prompts.py [--prompts spec_compiler/data/prompts_train_wide.jsonl]
        [--val-frac 0.05] [--out spec_compiler/data/prompts_fit_wide.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spec_compiler.train.corpus import is_val_prompt  # noqa: E402


def heldout(lines: list[str], frac: float) -> list[str]:
    """The rows (a prompt file's non-empty lines, row i is prompt index i) held out at `frac`."""
    rows = [x for x in lines if x.strip()]
    return [x for i, x in enumerate(rows) if is_val_prompt(i, frac)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=Path, default=REPO / "spec_compiler/data/prompts_train_wide.jsonl")
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=REPO / "spec_compiler/data/prompts_fit_wide.jsonl")
    args = ap.parse_args(argv)
    rows = heldout(args.prompts.read_text().splitlines(), args.val_frac)
    args.out.write_text("".join(x + "\n" for x in rows))
    print(f"wrote {args.out}: {len(rows)} held-out prompts of {args.prompts.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
