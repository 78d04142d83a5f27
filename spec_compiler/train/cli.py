"""`spec-train MODEL_DIR --out DRAFT_DIR`: an EAGLE draft head by online distillation.

The loop: take `--gen-batch` prompts (shuffled epochs over the prompt file), let the target
continue them itself (greedy unless --temperature) up to --max-new-tokens, keeping its features;
then make `--reuse` passes over that batch in minibatches of `--batch-size` sequences, one
optimizer step each; repeat until `--tokens` supervised positions have been trained (or
--max-steps). Generation is the slow part on a CPU, which is why each batch is reused.

Output (DRAFT_DIR): config.json + model.safetensors in the EAGLE-1/2 reference format (what
`spec-compile --draft` reads), and training.json (command line, settings, prompt-file sha256,
model hashes, final metrics, history; paths repository-relative), all three swapped in at once. Checkpoints: DRAFT_DIR/checkpoints (or --checkpoint-dir);
`--resume` continues from the newest one. Bad input: one line `error: ...`, exit code 2.

`--corpus CORPUS_DIR` (made by `spec-corpus`) replaces the generation: batches are drawn from the
corpus, a hash-based share of its prompts is held out for validation and early stopping, and
the draft written is the best by validation (docs/training.md, "Corpus and GPU-scale training").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import add_verbose_flag, cli_entry
from .data import DEFAULT_TRAIN_PROMPTS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-train", description=(
        "Train an EAGLE draft head for a Llama checkpoint by online distillation: the target "
        "generates its own continuations of a prompt set, and the draft learns its features "
        "and next-token distributions."))
    a = p.add_argument
    a("model_dir", type=Path, help="Hugging Face Llama checkpoint directory (with tokenizer)")
    a("--out", type=Path, required=True, help="draft directory to write")
    a("--arch", choices=("eagle", "eagle3"), default="eagle",
      help="eagle: an EAGLE-1/2 head on the target's last hidden state (feature + KL loss); eagle3: "
           "an EAGLE-3 head on three fused target layers, its own lm_head, trained with "
           "training-time test and a token-level loss (default eagle)")
    a("--layers", type=int, default=1, help="draft decoder layers (default 1; eagle3: 1)")
    a("--ttt-steps", type=int, default=3,
      help="eagle3: draft steps unrolled in training (training-time test; default 3)")
    a("--aux-layers", type=_layers, default=None,
      help="eagle3: the three target layers whose inputs are fused, e.g. 2,16,29 (default: the "
           "reference's 2, L/2, L-3)")
    a("--prompts", type=Path, default=None,
      help=f"JSON-lines prompt file (default: the packaged training prompts, "
           f"{DEFAULT_TRAIN_PROMPTS.name}); not with --corpus")
    a("--corpus", type=Path, default=None,
      help="train from a spec-corpus directory (the target's continuations, made once) instead of "
           "generating online; --gen-batch then counts corpus sequences per featurized batch")
    a("--corpus-tokens", type=int, default=None,
      help="--corpus: train on a fixed subset of its training split, the first sequences of one "
           "fixed order (the same for every seed) up to N new tokens: subsets of growing N are "
           "nested, for data-size curves (default: all)")
    a("--val-frac", type=float, default=None,
      help="--corpus: share of the training prompts held out for validation, picked by a hash of "
           "the prompt's index (default 0.05; 0: none)")
    a("--val-every", type=int, default=None,
      help="--corpus: validation loss and top-1 every N steps (default 100)")
    a("--val-seqs", type=int, default=None,
      help="--corpus: held-out sequences scored (default 256, a fixed seeded sample)")
    a("--patience", type=int, default=None,
      help="--corpus: stop after K validations without a lower validation loss (default 5; 0: "
           "never); the draft written is the best by validation")
    a("--tokens", type=int, default=1_000_000,
      help="stop after this many supervised positions trained, reuse counted (default 1M)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--max-new-tokens", type=int, default=192, help="continuation length per prompt (default 192)")
    a("--max-prompt-tokens", type=int, default=512, help="prompts are cut to their last N tokens")
    a("--gen-batch", type=int, default=64, help="prompts the target continues at once (default 64)")
    a("--batch-size", type=int, default=8, help="sequences per optimizer step (default 8)")
    a("--reuse", type=int, default=2, help="optimizer passes over each generated batch (default 2)")
    a("--lr", type=float, default=5e-4, help="AdamW peak learning rate (default 5e-4)")
    a("--warmup", type=int, default=20, help="linear warm-up steps (default 20)")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=0.5, help="gradient-norm clip (default 0.5, as EAGLE)")
    a("--w-feat", type=float, default=1.0, help="weight of the SmoothL1 feature loss (default 1.0)")
    a("--w-kl", type=float, default=0.1, help="weight of the KL to the target (default 0.1)")
    a("--noise", type=float, default=0.05,
      help="uniform input-feature noise, half-width as a fraction of the feature RMS (default 0.05)")
    a("--temperature", type=temperatures, default=(0.0,),
      help="target sampling temperature for the continuations (default 0: greedy); a comma "
           "list (e.g. 0,0.7) cycles over generation batches")
    a("--seed", type=int, default=0)
    a("--device", choices=("cpu", "cuda"), default="cpu")
    a("--target-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="the target's weights while training (default auto: bfloat16 on cuda, float32 on cpu)")
    a("--draft-vocab", type=int, default=0,
      help="also write a hot-token vocabulary of the N tokens the target generated most often "
           "(EAGLE-3 d2t/t2d; spec-compile then drafts over those N only; default 0: full)")
    a("--time-limit", type=float, default=None,
      help="stop after this many seconds (wall clock, loading included) and write the draft")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    a("--checkpoint-dir", type=Path, default=None, help="default: DRAFT_DIR/checkpoints")
    a("--checkpoint-part-mb", type=float, default=15.0,
      help="a checkpoint larger than this (MiB) is written in parts of this size (default 15)")
    a("--keep-checkpoints", type=int, default=2,
      help="newest checkpoints kept (default 2; 1 is safe too: the older goes only once the new one "
           "is complete)")
    a("--resume", action="store_true", help="continue from the newest checkpoint")
    a("--resume-if-any", action="store_true",
      help="continue from the newest checkpoint if there is one, else start: one command for every "
           "call of a run cut into calls")
    a("--init-from", type=Path, default=None, metavar="DRAFT_DIR",
      help="start from this finished draft's weights (the same --arch, --layers / --aux-layers and "
           "hot vocabulary) with a fresh optimizer and schedule: to train a draft further once its "
           "checkpoint is gone; recorded in training.json (init_from)")
    a("--save-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    a("--log-every", type=int, default=5, help="progress line every N steps (default 5)")
    a("--eval-prompts", type=Path, default=None,
      help="after training, score the draft on these prompts' continuations (training.json)")
    a("--eval-n", type=int, default=32, help="prompts of --eval-prompts to score (default 32)")
    return add_verbose_flag(p)


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of layer indices")


def temperatures(text: str) -> tuple[float, ...]:
    """`--temperature`: a number or a comma list, each >= 0 (NaN refused)."""
    try:
        ts = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or a comma list of numbers")
    if any(not t >= 0 for t in ts):
        raise argparse.ArgumentTypeError(f"{text!r}: temperatures must be >= 0")
    return ts


@cli_entry(interrupted="interrupted: continue with the same command plus --resume")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    from .loop import train
    from .options import command_line

    train(args, command=command_line("spec-train", argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
