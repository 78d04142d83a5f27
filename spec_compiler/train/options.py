"""`spec-train`'s settings beyond argparse: the checks, what a resume must share, and how the
run's settings and command line are recorded (training.json, checkpoints)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import torch

from ..errors import SpecCompileError
from ..hashing import record_path
from .checkpoint import list_checkpoints
from .data import DEFAULT_TRAIN_PROMPTS

# Settings a resumed run must share with the checkpoint (the rest are stop criteria or plumbing).
RESUME_KEYS = ("layers", "max_new_tokens", "gen_batch", "batch_size", "reuse", "lr", "warmup",
               "w_feat", "w_kl", "noise", "temperature", "seed", "weight_decay", "grad_clip",
               "max_prompt_tokens", "target_dtype", "arch", "ttt_steps", "aux_layers",
               "val_frac", "val_every", "val_seqs", "corpus_tokens")
# What a checkpoint written before a setting existed ran with.
RESUME_DEFAULTS = {"arch": "eagle", "ttt_steps": 3, "aux_layers": None, "val_frac": None, "val_every": None,
                   "val_seqs": None, "corpus_tokens": None}
# With --corpus: the validation split's defaults (online training has no held-out split).
VAL_DEFAULTS = {"val_frac": 0.05, "val_every": 100, "val_seqs": 256, "patience": 5}


def resolve_args(args) -> None:
    """Fill what depends on the mode or the disk: --resume-if-any, --prompts (online), the
    validation flags (--corpus); a flag the mode does not use is an error, not silently ignored."""
    if args.resume_if_any and not args.resume:
        args.resume = bool(list_checkpoints(args.checkpoint_dir or args.out / "checkpoints"))
        if not args.resume:
            print("--resume-if-any: no checkpoint yet; starting", file=sys.stderr)
    if args.corpus is not None:
        if args.prompts is not None:
            raise SpecCompileError("--prompts: not used with --corpus (the corpus records its prompt "
                                   "file); drop it")
        for k, v in VAL_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    else:
        if args.prompts is None:
            args.prompts = DEFAULT_TRAIN_PROMPTS
        for k in (*VAL_DEFAULTS, "corpus_tokens"):
            if getattr(args, k) is not None:
                raise SpecCompileError(f"--{k.replace('_', '-')}: only with --corpus (online training "
                                       "has no held-out split); drop it")


def check_args(args) -> None:
    for flag in ("layers", "tokens", "max_new_tokens", "max_prompt_tokens", "gen_batch",
                 "batch_size", "reuse", "save_every", "log_every", "eval_n", "keep_checkpoints"):
        v = getattr(args, flag)
        if v <= 0:
            raise SpecCompileError(f"--{flag.replace('_', '-')} {v}: must be a positive integer")
    if args.arch == "eagle3":
        if args.layers != 1:
            raise SpecCompileError(f"--layers {args.layers}: an EAGLE-3 head has one decoder layer; "
                                   "drop --layers")
        if args.ttt_steps < 1:
            raise SpecCompileError(f"--ttt-steps {args.ttt_steps}: must be a positive integer")
    elif args.aux_layers is not None:
        raise SpecCompileError("--aux-layers: only for --arch eagle3")
    if args.draft_vocab < 0:
        raise SpecCompileError(f"--draft-vocab {args.draft_vocab}: must be >= 0 (0: full vocabulary)")
    if args.time_limit is not None and not args.time_limit > 0:
        raise SpecCompileError(f"--time-limit {args.time_limit}: must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        raise SpecCompileError(f"--max-steps {args.max_steps}: must be a positive integer")
    if args.init_from is not None and not args.init_from.is_dir():
        raise SpecCompileError(f"--init-from {args.init_from}: no such draft directory")
    if not args.lr > 0:
        raise SpecCompileError(f"--lr {args.lr}: must be positive")
    for flag in ("w_feat", "w_kl", "noise", "weight_decay", "grad_clip"):
        if getattr(args, flag) < 0:
            raise SpecCompileError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if args.w_feat == 0 and args.w_kl == 0:
        raise SpecCompileError("--w-feat and --w-kl are both 0: nothing to train")
    if not args.model_dir.is_dir():
        raise SpecCompileError(f"MODEL_DIR {args.model_dir}: no such directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SpecCompileError("--device cuda: no CUDA device is available; use --device cpu")
    if args.threads is not None and args.threads <= 0:
        raise SpecCompileError(f"--threads {args.threads}: must be a positive integer")
    if not args.checkpoint_part_mb > 0:
        raise SpecCompileError(f"--checkpoint-part-mb {args.checkpoint_part_mb}: must be positive")
    if args.corpus is not None:
        if not args.corpus.is_dir():
            raise SpecCompileError(f"--corpus {args.corpus}: no such directory; make one with spec-corpus")
        if not 0 <= args.val_frac < 1:
            raise SpecCompileError(f"--val-frac {args.val_frac}: must be in [0, 1) (0: no validation)")
        for flag in ("val_every", "val_seqs"):
            if getattr(args, flag) <= 0:
                raise SpecCompileError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a "
                                       "positive integer")
        if args.corpus_tokens is not None and args.corpus_tokens <= 0:
            raise SpecCompileError(f"--corpus-tokens {args.corpus_tokens}: must be a positive integer")
        if args.patience < 0:
            raise SpecCompileError(f"--patience {args.patience}: must be >= 0 (0: never stop early)")
    if not args.resume:
        if any((args.out / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                                 "training.json")):
            raise SpecCompileError(f"--out {args.out} already holds a trained draft; choose another "
                                   "directory or remove it")
        if list_checkpoints(args.checkpoint_dir or args.out / "checkpoints"):
            raise SpecCompileError(f"--out {args.out} has checkpoints from an earlier run; pass "
                                   "--resume to continue it, or remove them")


def target_dtype(args) -> str:
    """The target's weights while training or generating: `--target-dtype`, auto = bfloat16 on
    cuda, float32 on cpu."""
    if args.target_dtype != "auto":
        return args.target_dtype
    return "bfloat16" if args.device == "cuda" else "float32"


def settings(args) -> dict:
    """The flags as recorded: JSON values, paths by `record_path` (repository-relative)."""
    return {k: (record_path(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in vars(args).items()}


def command_line(prog: str, argv: list[str]) -> str:
    """The command as recorded: absolute paths among the arguments (also `--flag=/path`) by
    `record_path`, the rest as typed."""
    def arg(a: str) -> str:
        flag, eq, value = a.partition("=") if a.startswith("-") else ("", "", a)
        return flag + eq + record_path(value) if os.path.isabs(value) else a
    return shlex.join([prog, *map(arg, argv)])
