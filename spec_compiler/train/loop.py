"""The training loop behind `spec-train` (flags: see cli.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..config import DraftConfig, Eagle3Config, eagle3_default_layers
from ..engine_format import DTYPES
from ..errors import SpecCompileError
from ..hashing import record_path, sha256_file, weights_sha256
from ..loading import load_target
from ..models.eagle import EagleDraft
from ..models.eagle3 import Eagle3Draft
from .checkpoint import load_latest, save_checkpoint
from .corpus import corpus_sha256, read_corpus, read_index, split_by_prompt
from .data import batch_prompt_ids, encode_prompts, load_tokenizer, prompt_order, read_prompts
from .distill import collate, distill_loss, lr_at, minibatches, supervised_range
from .eagle3 import ttt_loss
from .generate import Sequence, continue_prompts, featurize, greedy_continuations
from .options import RESUME_DEFAULTS, RESUME_KEYS, check_args, resolve_args, settings, target_dtype
from .save import save_draft, save_eagle3

FROZEN = ("embed_tokens.", "lm_head.")  # the target's, shared and frozen


def build_draft(target, n_layers: int, seed: int) -> EagleDraft:
    """A fresh draft (PyTorch default init) sharing the target's embedding and lm_head."""
    cfg = DraftConfig(n_layers=n_layers, fc_bias=True, has_embed=False,
                      layer=dataclasses.replace(target.cfg, n_layers=n_layers))
    torch.manual_seed(seed)
    with torch.device(target.embed_tokens.weight.device):
        draft = EagleDraft(cfg, target.cfg)
    draft.embed_tokens.weight = target.embed_tokens.weight
    draft.lm_head.weight = target.lm_head.weight
    return draft


def build_eagle3(target, aux_layers: tuple[int, ...] | None, seed: int,
                 hot: torch.Tensor | None = None) -> Eagle3Draft:
    """A fresh EAGLE-3 head (PyTorch default init) reading the target layers `aux_layers`
    (default: the reference's), sharing the target's embedding; its own lm_head starts as a copy
    of the target's: of its `hot` rows only when the hot vocabulary is known before training (a
    corpus), as EAGLE-3 trains it, else the full vocabulary (the hot rows are picked when it is
    written)."""
    L = target.cfg.n_layers
    aux = tuple(aux_layers) if aux_layers is not None else eagle3_default_layers(L)
    if len(aux) != 3 or len(set(aux)) != 3 or not all(0 <= i < L for i in aux):
        raise SpecCompileError(f"--aux-layers {','.join(map(str, aux))}: need three distinct target layers in "
                               f"[0, {L})" + ("" if aux_layers is not None else
                                               "; the reference's default does not fit this target, name them"))
    c = target.cfg
    cfg = Eagle3Config(layer=dataclasses.replace(c, n_layers=1, head_dim=c.hidden_size // c.n_heads),
                       target_hidden_size=c.hidden_size, aux_layers=tuple(sorted(aux)), has_embed=False,
                       draft_vocab_size=None if hot is None else hot.numel())
    torch.manual_seed(seed)
    with torch.device(target.embed_tokens.weight.device):
        draft = Eagle3Draft(cfg, c)
    draft.embed_tokens.weight = target.embed_tokens.weight
    lm = target.lm_head.weight.detach()
    if hot is not None:
        draft.hot_ids.copy_(hot)
        lm = lm[hot.to(lm.device)]
    draft.lm_head.weight.data.copy_(lm)
    return draft


def trainable(draft: EagleDraft | Eagle3Draft) -> dict[str, torch.nn.Parameter]:
    frozen = ("embed_tokens.",) if isinstance(draft, Eagle3Draft) else FROZEN  # its lm_head is its own
    return {n: p for n, p in draft.named_parameters() if not n.startswith(frozen)}


def init_record(init_dir: Path) -> dict:
    """training.json's `init_from`: the draft a run started from (--init-from), by path and
    weights hash, with the tokens it had seen (its training.json, if it has one)."""
    from ..tree_choice import draft_weights_sha256

    try:
        seen = json.loads((init_dir / "training.json").read_text())["final_metrics"]["tokens_seen"]
    except (OSError, ValueError, KeyError, TypeError):
        seen = None
    return {"dir": record_path(init_dir), "weights_sha256": draft_weights_sha256(init_dir), "tokens_seen": seen}


def init_weights(draft: EagleDraft | Eagle3Draft, init_dir: Path, target) -> None:
    """--init-from: `draft`'s trainable weights from the finished draft in `init_dir` (the same
    kind, layers, fused target layers and hot vocabulary; an EAGLE-3 head's lm_head rows follow
    this run's hot-id order). Anything that does not fit: SpecCompileError naming it."""
    from ..loading import load_draft

    eagle3 = isinstance(draft, Eagle3Draft)
    what = f"--init-from {init_dir}"
    src = load_draft(init_dir, target)  # (an EAGLE-1/2 draft's lm_head is the target's: not trained)
    if isinstance(src, Eagle3Draft) != eagle3:
        raise SpecCompileError(f"{what}: an {'EAGLE-3' if not eagle3 else 'EAGLE-1/2'} draft, but this run "
                               f"trains {'EAGLE-3' if eagle3 else 'EAGLE-1/2'} (--arch); start from a draft "
                               "of the same kind")
    rows = None
    if eagle3:
        if tuple(src.cfg.aux_layers) != tuple(draft.cfg.aux_layers):
            raise SpecCompileError(f"{what}: it reads target layers {list(src.cfg.aux_layers)}, this run "
                                   f"{list(draft.cfg.aux_layers)}; use the same --aux-layers")
        mine, theirs = draft.hot_ids, src.hot_ids
        if (mine is None) != (theirs is None) or (mine is not None and (
                mine.numel() != theirs.numel() or set(mine.tolist()) != set(theirs.tolist()))):
            raise SpecCompileError(f"{what}: its hot vocabulary differs from this run's (the corpus's "
                                   "most frequent --draft-vocab tokens); use the corpus and --draft-vocab "
                                   "it was trained with")
        if mine is not None:
            at = {int(t): i for i, t in enumerate(theirs.tolist())}
            rows = torch.tensor([at[int(t)] for t in mine.tolist()])
    theirs, params = trainable(src), trainable(draft)
    extra = sorted(set(theirs) - set(params))
    if extra:  # e.g. a 2-layer draft into a 1-layer run: never drop weights silently
        raise SpecCompileError(f"{what}: it has {extra[0]}, which this run's draft has not; use the same "
                               "--layers / --aux-layers / --draft-vocab")
    for name, p in params.items():
        w = theirs.get(name)
        if w is not None and name == "lm_head.weight" and rows is not None:
            w = w[rows]
        if w is None or w.shape != p.shape:
            raise SpecCompileError(f"{what}: {name} {'is missing' if w is None else f'has shape {tuple(w.shape)}'}, "
                                   f"this run's is {tuple(p.shape)}; use the same --layers / --aux-layers / "
                                   "--draft-vocab")
        p.data.copy_(w.to(p.device, p.dtype))


def _seed(*parts: int) -> torch.Generator:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p) % (1 << 62)
    return torch.Generator().manual_seed(s)


def _pack(seqs: list[Sequence]) -> dict:
    """The generation batch without its features (a resume recomputes them: deterministic)."""
    return {"tokens": [s.tokens for s in seqs], "prompt_len": [s.prompt_len for s in seqs],
            "ended": [s.ended for s in seqs]}


def _unpack(d: dict) -> list[Sequence]:
    return [Sequence(t, None, p, e) for t, p, e in zip(d["tokens"], d["prompt_len"], d["ended"])]


def hot_ids(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` most frequent token ids, most frequent first (ties: lower id first)."""
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    return torch.tensor(order[:n], dtype=torch.long)


class _Meter:
    """Token-weighted running means of the step metrics."""

    def __init__(self):
        self.sums, self.n, self.steps = {}, 0, 0

    def add(self, m: dict, n: int):
        for k, v in m.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.n += n
        self.steps += 1

    def means(self) -> dict:
        return {k: v / max(1, self.n) for k, v in self.sums.items()}


def _fmt_t(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def data_subset(train: list[Sequence], new_tokens: int) -> list[Sequence]:
    """The first training sequences of one fixed order (not the run's --seed: the subsets of
    every run on a corpus are nested) while their new tokens stay within `new_tokens` (at least
    one sequence), kept in corpus order."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(20261130)).tolist()
    keep, total = [], 0
    for i in order:
        if keep and total + train[i].n_new > new_tokens:
            break
        keep.append(i)
        total += train[i].n_new
    return [train[i] for i in sorted(keep)]


class _Corpus:
    """`--corpus`: the training and validation sequences (no features) and what is recorded."""

    def __init__(self, args, model: dict):
        index = read_index(args.corpus)
        if (index["model"]["config_sha256"], index["model"]["weights_sha256"]) != \
                (model["config_sha256"], model["weights_sha256"]):
            raise SpecCompileError(f"--corpus {args.corpus} holds continuations of another model "
                                   f"({index['model']['dir']}); train that MODEL_DIR, or make a corpus "
                                   "of this one with spec-corpus")
        if not index.get("complete"):
            print(f"note: --corpus {args.corpus} is unfinished ({index['batches_done']} generation "
                  "batches); training uses what it holds", file=sys.stderr)
        seqs = [s for s in read_corpus(args.corpus) if supervised_range(s)[1] > supervised_range(s)[0]]
        train, val = split_by_prompt(seqs, args.val_frac)
        if not train:
            raise SpecCompileError(f"--val-frac {args.val_frac}: holds out every prompt of the corpus; "
                                   "lower it")
        if args.corpus_tokens is not None:
            train = data_subset(train, args.corpus_tokens)
        if args.val_frac > 0 and not val:
            raise SpecCompileError(f"--val-frac {args.val_frac}: no prompt of the corpus's "
                                   f"{index['prompts']['n_prompts']} falls in the validation split; "
                                   "raise it, or pass --val-frac 0 for none")
        if len(val) > args.val_seqs:  # a fixed seeded sample, kept in corpus order
            keep = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))
            val = [val[i] for i in sorted(keep[:args.val_seqs].tolist())]
        self.train, self.val, self.prompts = train, val, index["prompts"]
        self.record = {
            "dir": record_path(args.corpus), "sha256": corpus_sha256(index),
            "corpus_tokens": args.corpus_tokens,
            "complete": bool(index.get("complete")), "settings": index["settings"],
            "n_sequences": index["totals"]["n_sequences"], "n_new": index["totals"]["n_new"],
            "train_sequences": len(train), "train_new": sum(s.n_new for s in train),
            "train_prompts": len({s.prompt_index for s in train}),
            "val_prompts": len({s.prompt_index for s in seqs} - {s.prompt_index for s in train}),
            "val_sequences_scored": len(val), "val_new_scored": sum(s.n_new for s in val)}

    def batch(self, idx: int, size: int, seed: int) -> list[Sequence]:
        """Generation batch `idx`: `size` training sequences, seeded shuffled epochs (fresh
        copies: featurize fills them)."""
        return [dataclasses.replace(s, features=None)
                for s in (self.train[i] for i in batch_prompt_ids(len(self.train), size, idx, seed))]

    def used(self, batches: int, size: int, seed: int) -> dict:
        """The distinct training sequences that the first `batches` batches drew (epoch 0 is a
        permutation: they are its prefix) and their new tokens."""
        n = min(len(self.train), batches * size)
        first = prompt_order(len(self.train), seed, 0)[:n]
        return {"corpus_sequences_used": n, "corpus_tokens_used": sum(self.train[i].n_new for i in first),
                "epochs": round(batches * size / len(self.train), 3)}


def train(args, command: str) -> dict:
    resolve_args(args)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ckpt_dir = args.checkpoint_dir or args.out / "checkpoints"
    model = {"dir": record_path(args.model_dir), "config_sha256": sha256_file(args.model_dir / "config.json"),
             "weights_sha256": weights_sha256(args.model_dir)}
    corpus = _Corpus(args, model) if args.corpus is not None else None
    rows = read_prompts(args.prompts) if corpus is None else None
    target = load_target(args.model_dir, target_dtype(args)).to(dev)
    target.requires_grad_(False)
    if corpus is None:
        ids = encode_prompts(rows, load_tokenizer(args.model_dir), target.cfg.vocab_size, args.prompts,
                             args.max_prompt_tokens)
        info = {"prompts": {"path": record_path(args.prompts), "sha256": sha256_file(args.prompts),
                            "n_prompts": len(ids)}, "model": model}
    else:
        info = {"prompts": corpus.prompts, "model": model, "corpus": corpus.record}
    eos = target.cfg.eos_token_ids

    eagle3 = args.arch == "eagle3"
    counts = torch.zeros(target.cfg.vocab_size, dtype=torch.long)
    if corpus is not None:  # the hot vocabulary's counts: over the training split
        counts = torch.bincount(torch.cat([s.tokens[s.prompt_len:] for s in corpus.train]),
                                minlength=target.cfg.vocab_size)
    # EAGLE-3 with a corpus: the hot vocabulary is known before training, and the head's lm_head
    # trains over it alone (the reference's way; its checkpoint then holds N rows, not V)
    hot = hot_ids(counts, args.draft_vocab) if eagle3 and corpus is not None and args.draft_vocab else None
    draft = (build_eagle3(target, args.aux_layers, args.seed, hot) if eagle3
             else build_draft(target, args.layers, args.seed))
    # EAGLE-3 learns from the fused layers and the target's next-token distribution (its last
    # hidden state, stored beside them); EAGLE-1/2 from the last hidden state alone.
    target.feature_layers = draft.cfg.fused_layers
    if args.init_from is not None:
        info["init_from"] = init_record(args.init_from)
        if not args.resume:  # a resumed run's weights are its checkpoint's (same init: _check_resume)
            init_weights(draft, args.init_from, target)
            print(f"initialized from {args.init_from} ({info['init_from']['tokens_seen'] or '?'} tokens "
                  "seen there); fresh optimizer and schedule", file=sys.stderr)
    params = trainable(draft)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)
    noise_gen = torch.Generator(dev).manual_seed(args.seed)
    st = {"step": 0, "tokens_seen": 0, "generated": 0, "gen_idx": 0, "pass": 0, "mb": 0,
          "train_s": 0.0, "gen_s": 0.0, "feat_s": 0.0, "wall_s": 0.0, "history": [], "commands": [command],
          "counts": counts, "val_history": [], "best": None, "bad_vals": 0, "early_stop": False}
    seqs: list[Sequence] | None = None
    best_w: dict[str, torch.Tensor] | None = None  # the best-by-validation weights, in --save-dtype
    if args.resume:
        path, ck = load_latest(ckpt_dir)
        _check_resume(ck, args, info, path)
        if tuple(ck["draft"]["lm_head.weight"].shape if "lm_head.weight" in ck["draft"] else ()) not in \
                ((), tuple(params["lm_head.weight"].shape) if "lm_head.weight" in params else ()):
            raise SpecCompileError(f"--resume: {path} trained an lm_head over "
                                   f"{ck['draft']['lm_head.weight'].shape[0]} tokens, this run's has "
                                   f"{params['lm_head.weight'].shape[0]}; use the same --draft-vocab")
        for n, p in params.items():
            p.data.copy_(ck["draft"][n])
        opt.load_state_dict(ck["optimizer"])
        noise_gen.set_state(ck["noise_rng"])
        best_w = ck.get("best")
        st = {**st, **ck["state"], "commands": ck["state"]["commands"] + [command]}
        seqs = featurize(target, _unpack(ck["batch"]), with_final=eagle3) if ck["batch"] is not None else None
        print(f"resumed from {path} at step {st['step']} ({st['tokens_seen']} tokens)",
              file=sys.stderr)
    wall0 = st["wall_s"]
    val: list[Sequence] = []
    if corpus is not None:
        st["counts"] = counts
        if corpus.val:  # featurized once per run, kept in memory
            t0 = time.time()
            val = featurize(target, [dataclasses.replace(s, features=None)
                                     for s in corpus.val], with_final=eagle3)
            print(f"validation: {len(val)} sequences of {corpus.record['val_prompts']} held-out prompts, "
                  f"featurized in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    # --patience may change on a resume (a stop criterion, as --tokens): judged with this run's
    st["early_stop"] = bool(val) and args.patience > 0 and st["bad_vals"] >= args.patience
    draft.train()

    def checkpoint():
        st["wall_s"] = wall0 + time.time() - t_start
        save_checkpoint(ckpt_dir, st["step"], {
            "draft": {n: p.detach().cpu() for n, p in params.items()},
            "optimizer": opt.state_dict(), "noise_rng": noise_gen.get_state(), "state": st,
            "settings": settings(args), "info": info, "best": best_w,
            # a corpus batch is rebuilt from the corpus on resume
            "batch": _pack(seqs) if seqs is not None and corpus is None else None},
            keep=args.keep_checkpoints, part_bytes=int(args.checkpoint_part_mb * (1 << 20)))

    def validate() -> dict:
        m = _validate(draft, target, val, args, dev, eagle3)
        return {"step": st["step"], "tokens_seen": st["tokens_seen"],
                "wall_s": round(wall0 + time.time() - t_start, 1), **{k: round(v, 5) for k, v in m.items()}}

    meter, recent = _Meter(), []
    t_log, n_log = time.time(), 0
    done = _done(st, args, t_start)
    while not done:
        if seqs is None and corpus is not None:
            t0 = time.time()
            seqs = featurize(target, corpus.batch(st["gen_idx"], args.gen_batch, args.seed), with_final=eagle3)
            dt = time.time() - t0
            st["feat_s"] += dt
            print(f"corpus batch {st['gen_idx']} (epoch {st['gen_idx'] * args.gen_batch // len(corpus.train)}): "
                  f"{len(seqs)} sequences, {sum(s.n_new for s in seqs)} new tokens, featurized in {dt:.1f}s",
                  file=sys.stderr, flush=True)
        if seqs is None:
            t0 = time.time()
            pids = batch_prompt_ids(len(ids), args.gen_batch, st["gen_idx"], args.seed)
            gen = torch.Generator(dev).manual_seed(_seed(args.seed, st["gen_idx"], 1).initial_seed())
            seqs = featurize(target, continue_prompts(
                target, [ids[i] for i in pids], args.max_new_tokens, eos,
                args.temperature[st["gen_idx"] % len(args.temperature)], gen), with_final=eagle3)
            dt = time.time() - t0
            new = sum(s.n_new for s in seqs)
            for s in seqs:
                st["counts"] += torch.bincount(s.tokens[s.prompt_len:], minlength=len(st["counts"]))
            st["gen_s"] += dt
            st["generated"] += new
            seqs = [s for s in seqs if supervised_range(s)[1] > supervised_range(s)[0]]
            print(f"gen batch {st['gen_idx']}: {len(pids)} prompts, {new} new tokens in {dt:.0f}s "
                  f"({new / dt:.1f} tok/s)", file=sys.stderr, flush=True)
            if not seqs:  # every continuation too short to supervise: next batch
                st["gen_idx"] += 1
                seqs = None
                continue
        groups = minibatches(seqs, args.batch_size, _seed(args.seed, st["gen_idx"], 2, st["pass"]))
        while st["mb"] < len(groups) and not done:
            t0 = time.time()
            batch = collate([seqs[i] for i in groups[st["mb"]]], dev)
            lr = lr_at(st["step"], _progress(st, args, t_start, corpus is not None), args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                if eagle3:
                    loss, m = ttt_loss(draft, target.lm_head, batch.tokens, batch.features, batch.mask,
                                       args.ttt_steps, draft.hot_ids)
                else:
                    loss, m = distill_loss(draft, batch, args.w_feat, args.w_kl, args.noise, noise_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip)
            opt.step()
            n = batch.n_tokens
            st["step"] += 1
            st["tokens_seen"] += n
            st["mb"] += 1
            st["train_s"] += time.time() - t0
            meter.add(m, n)
            recent = (recent + [(m, n)])[-20:]
            n_log += n
            if val and st["step"] % args.val_every == 0:
                rec = validate()
                st["val_history"].append(rec)
                if st["best"] is None or rec["loss"] < st["best"]["loss"]:
                    st["best"], st["bad_vals"] = rec, 0
                    best_w = {k: p.detach().to("cpu", DTYPES[args.save_dtype], copy=True)
                              for k, p in params.items()}
                else:
                    st["bad_vals"] += 1
                    st["early_stop"] = args.patience > 0 and st["bad_vals"] >= args.patience
                print(f"validation step {st['step']}: loss {rec['loss']:.4f}, acc {rec['acc']:.3f} "
                      f"(best {st['best']['loss']:.4f} at step {st['best']['step']}"
                      + (f"; no better for {st['bad_vals']}/{args.patience}" if st["bad_vals"] else "")
                      + ")", file=sys.stderr, flush=True)
            done = _done(st, args, t_start)
            if st["step"] % args.log_every == 0 or done:
                _log(st, args, meter, lr, n_log / max(1e-9, time.time() - t_log), wall0 + time.time() - t_start)
                meter, t_log, n_log = _Meter(), time.time(), 0
            if st["mb"] == len(groups):  # advance the cursor before a checkpoint records it
                st["pass"], st["mb"] = st["pass"] + 1, 0
                if st["pass"] == args.reuse:
                    st["pass"], seqs = 0, None
                    st["gen_idx"] += 1
            if st["step"] % args.save_every == 0 or done:
                checkpoint()
            if st["mb"] == 0:
                break

    final = _Meter()
    for m, n in recent:
        final.add(m, n)
    stop = _stop_reason(st, args, t_start) or "nothing left to do"
    metrics = {"step": st["step"], "tokens_seen": st["tokens_seen"],
               "generated_tokens": st["generated"], "last_20_steps": final.means()}
    validation = None
    if corpus is not None:
        started = st["gen_idx"] + (1 if st["pass"] or st["mb"] else 0)
        metrics.update(corpus.used(started, args.gen_batch, args.seed))
    if val:
        last = validate() if not st["val_history"] or st["val_history"][-1]["step"] != st["step"] else None
        written = "last"
        if best_w is not None and (last is None or last["loss"] >= st["best"]["loss"]):
            for k, p in params.items():  # the best by validation is what is written
                p.data.copy_(best_w[k])
            written = f"best (step {st['best']['step']})"
        validation = {"val_frac": args.val_frac, "every": args.val_every, "patience": args.patience,
                      "history": st["val_history"], "best": st["best"],
                      "last": last, "written": written}
        print(f"validation: writing the {written} weights", file=sys.stderr)
    st["wall_s"] = wall0 + time.time() - t_start
    metrics["wall_s"] = round(st["wall_s"], 1)
    dev_eval = _dev_eval(draft, target, args) if args.eval_prompts else None
    _write_draft(draft, args, info, st, metrics, dev_eval, stop, validation)
    return metrics


@torch.no_grad()
def _validate(draft, target, val: list[Sequence], args, dev, eagle3: bool) -> dict:
    """Teacher-forced validation metrics (the training log's, without input noise), token-weighted
    over the held-out sequences, in length-sorted minibatches."""
    meter = _Meter()
    order = sorted(range(len(val)), key=lambda i: len(val[i].tokens))
    for r in range(0, len(order), args.batch_size):
        batch = collate([val[i] for i in order[r:r + args.batch_size]], dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            if eagle3:
                _, m = ttt_loss(draft, target.lm_head, batch.tokens, batch.features, batch.mask, args.ttt_steps,
                                draft.hot_ids)
            else:
                _, m = distill_loss(draft, batch, args.w_feat, args.w_kl, 0.0)
        meter.add(m, batch.n_tokens)
    return meter.means()


def _stop_reason(st, args, t_start: float) -> str | None:
    if st.get("early_stop"):
        return "early stop"
    if st["tokens_seen"] >= args.tokens:
        return "tokens"
    if args.max_steps is not None and st["step"] >= args.max_steps:
        return "max steps"
    if args.time_limit is not None and time.time() - t_start >= args.time_limit:
        return "time limit"
    return None


def _done(st, args, t_start: float) -> bool:
    return _stop_reason(st, args, t_start) is not None


def _progress(st, args, t_start: float, by_tokens: bool = False) -> float:
    """Share of the run done: tokens, or wall time under --time-limit, whichever is further.
    With `by_tokens` (--corpus) tokens alone: --time-limit there bounds one call of a run
    resumed across calls, and the schedule must not depend on where the calls stop."""
    frac = st["tokens_seen"] / args.tokens
    if args.time_limit is not None and not by_tokens:
        frac = max(frac, (time.time() - t_start) / args.time_limit)
    return min(1.0, frac)


def _log(st, args, meter, lr, tps, wall: float):
    m = meter.means()
    gen_tps = st["generated"] / max(1e-9, st["gen_s"])
    parts = (f"feat {m['feat']:.4f}, kl {m['kl']:.3f}" if "feat" in m else
             f"kl {m['kl']:.3f}, step {args.ttt_steps} kl {m['kl_last']:.3f}")
    data = (f"{tps:.0f} tok/s | train {_fmt_t(st['train_s'])} features {_fmt_t(st['feat_s'])}"
            if args.corpus is not None else
            f"{tps:.0f} tok/s (gen {gen_tps:.1f} tok/s) | train {_fmt_t(st['train_s'])} gen {_fmt_t(st['gen_s'])}")
    print(f"step {st['step']} | tokens {st['tokens_seen']}/{args.tokens} | loss {m['loss']:.4f} "
          f"({parts}) | acc {m['acc']:.3f} | lr {lr:.2e} | {data}", file=sys.stderr, flush=True)
    st["history"].append({"step": st["step"], "tokens_seen": st["tokens_seen"], "lr": lr,
                          "wall_s": round(wall, 1), **{k: round(v, 5) for k, v in m.items()}})


def _check_resume(ck: dict, args, info: dict, path: Path) -> None:
    if (ck["info"].get("corpus") or {}).get("sha256") != (info.get("corpus") or {}).get("sha256"):
        was = ck["info"].get("corpus")
        how = (f"on another corpus ({was['dir']}; its parts differ from this one's: other data, or more "
               "of it)" if was else "online (without --corpus)")
        raise SpecCompileError(f"--resume: {path} was trained {how}; use the same data to continue")
    old = ck["settings"]
    new = settings(args)
    diff = [k for k in RESUME_KEYS if old.get(k, RESUME_DEFAULTS.get(k)) != new[k]]
    if diff:
        k = diff[0]
        raise SpecCompileError(f"--resume: {path} was trained with --{k.replace('_', '-')} "
                               f"{old.get(k, RESUME_DEFAULTS.get(k))}, this run has {new[k]}; use the same "
                               "settings to continue")
    was, now = ck["info"].get("init_from"), info.get("init_from")
    if (was or {}).get("weights_sha256") != (now or {}).get("weights_sha256"):
        raise SpecCompileError(f"--resume: {path} started from "
                               f"{'the draft ' + was['dir'] if was else 'fresh weights'}, this run "
                               f"{'from ' + now['dir'] if now else 'without --init-from'}; use the same "
                               "--init-from to continue")
    for what in ("prompts", "model"):
        if ck["info"][what]["sha256" if what == "prompts" else "config_sha256"] != \
                info[what]["sha256" if what == "prompts" else "config_sha256"]:
            raise SpecCompileError(f"--resume: {path} was trained on other {what} "
                                   f"({ck['info'][what]['path' if what == 'prompts' else 'dir']}); "
                                   "use the same ones to continue")


def _dev_eval(draft, target, args) -> dict:
    from .evaluate import chain_acceptance

    t0 = time.time()
    seqs = greedy_continuations(target, args.model_dir, args.eval_prompts, args.eval_n,
                                args.max_new_tokens, args.gen_batch, args.max_prompt_tokens)
    draft.eval().to(target.embed_tokens.weight.dtype)  # the engine's dtype (bf16 on CUDA)
    res = chain_acceptance(draft, seqs)
    res.update(prompts=record_path(args.eval_prompts), sha256=sha256_file(args.eval_prompts),
               n_prompts=len(seqs), max_new_tokens=args.max_new_tokens,
               seconds=round(time.time() - t0, 1))
    print(f"dev: top-1 {res['top1']:.3f}, chain-1..5 tokens/call "
          f"{', '.join(f'{x:.2f}' for x in res['chain_tokens_per_call'])}", file=sys.stderr)
    return res


def _write_draft(draft, args, info, st, metrics, dev_eval, stop: str, validation: dict | None) -> None:
    """DRAFT_DIR's model.safetensors, config.json and training.json, swapped in together
    (save_draft): an interruption leaves the previous draft, if any, whole."""
    import transformers

    counts = st["counts"]
    hot = hot_ids(counts, args.draft_vocab) if args.draft_vocab else None
    record = {
        "format": "spec-train/1",
        "command": st["commands"][0],
        "resume_commands": st["commands"][1:],
        "settings": settings(args),
        **info,
        "draft": {"arch": args.arch, "n_layers": args.layers, "fc_bias": not isinstance(draft, Eagle3Draft),
                  "shares": ["embed_tokens"] if isinstance(draft, Eagle3Draft) else ["embed_tokens", "lm_head"],
                  "fused_layers": list(draft.cfg.fused_layers) or None,
                  "save_dtype": args.save_dtype,
                  "trainable_params": sum(p.numel() for p in trainable(draft).values()),
                  "draft_vocab": args.draft_vocab or None,
                  # share of the target's generated tokens that the hot set covers
                  "hot_coverage": (round(float(counts[hot].sum()) / max(1, int(counts.sum())), 4)
                                   if hot is not None else None)},
        "final_metrics": metrics,
        "stop_reason": stop,
        "validation": validation,
        "dev_eval": dev_eval,
        "time": {"train_s": round(st["train_s"], 1), "gen_s": round(st["gen_s"], 1),
                 "features_s": round(st["feat_s"], 1), "wall_s": round(st["wall_s"], 1)},
        "history": st["history"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    save = save_eagle3 if isinstance(draft, Eagle3Draft) else save_draft
    save(draft.cpu(), args.out, dtype=DTYPES[args.save_dtype], hot_ids=hot,
         extra_files={"training.json": json.dumps(record, indent=2) + "\n"})
    print(f"wrote {args.out} (step {st['step']}, {st['tokens_seen']} tokens)", file=sys.stderr)
