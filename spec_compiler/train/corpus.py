"""`spec-corpus MODEL_DIR --out CORPUS_DIR`: the target's continuations of a prompt set, generated
once at full speed and kept as compact token ids, for `spec-train --corpus`.

Generation is the slow half of online distillation, and a machine that runs one short command at
a time cannot hold a long online run. So the continuations are made once, in resumable steps,
and committed: `spec-train --corpus` recomputes the features from them on its own machine (one
teacher-forced forward per batch). The corpus is kept, not regenerated: a GPU's greedy decode is
not bit-reproducible across machines and library versions, so the same command elsewhere gives
approximately, not exactly, the same tokens.

Work: `--passes` passes over the prompt file; pass p continues every prompt once at temperature
`pass_temperature` (the list in order, then its sampling temperatures in turn), in generation batches of `--gen-batch` prompts (length-sorted within
the pass: little padding). Generation batch k is the unit of work: its sequences are written,
then the index records it, so a rerun of the same command resumes after the last recorded batch
(a finished corpus: nothing to do, nothing written); `--passes` may grow between runs.

Shards: `--shard I/N` makes only the batches k with k % N == I (seeded by k, as in one run), in
its own directory, so N GPUs generate one corpus at once; `spec-corpus merge SHARD... --out DIR`
repacks their frames in batch order into the corpus one unsharded run would make (the same parts,
byte for byte, and the same index but for its time and run records), up to the first batch no
shard holds yet.

Files (CORPUS_DIR):
    part-00000.bin ...  whole sequences as compressed token ids, each part at most `--part-mb`
                        (a run appends to the newest part while it fits)
    index.json          per part: file, sha256, bytes, sequences, tokens, new tokens, batches;
                        the model's and the prompt file's hashes, the generation settings, totals,
                        and per run its command, device, torch version and batches [first, last]
Every write is atomic (temporary + rename) and the index is written last: a crash leaves at
worst bytes past the recorded end of the newest part, or a part the index does not name, both
dropped by the next run.

A part is a run of frames, each `b"SPCF"`, u32 length, then an xz (lzma) block holding one
batch's sequences (or a share of one, when a batch does not fit a part): `b"SPC1"`, u32
sequences, u32 bytes per token id (2 when the vocabulary fits 16 bits, else 4), u32 batch index;
then per sequence u32 prompt index, u32 prompt length, u32 new tokens, u8 ended-with-EOS; then
every sequence's ids (prompt + continuation), concatenated. Little-endian throughout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import SpecCompileError, add_verbose_flag, brief, cli_entry
from ..fileio import (atomic_dir, atomic_write_bytes, atomic_write_text, output_lock, read_json_object,
                      read_recorded)
from ..hashing import record_path, sha256_file, weights_sha256
from .cli import temperatures
from .data import DEFAULT_WIDE_PROMPTS, encode_prompts, load_tokenizer, read_prompts
from .generate import Sequence, continue_prompts
from .options import target_dtype

FORMAT = "spec-corpus/1"
INDEX = "index.json"
_FRAME = b"SPCF"
_BLOCK = b"SPC1"
_HEAD = struct.Struct("<4sIII")
_PART = re.compile(r"^part-\d{5,}\.bin$")
# Settings that shape the corpus's bytes: an existing corpus continues only with the same ones.
SHAPE_KEYS = ("temperature", "max_new_tokens", "max_prompt_tokens", "gen_batch", "seed", "target_dtype",
              "part_mb", "shard")


def shard_arg(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N), 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= I < N")
    return i, n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-corpus", description=(
        "Let the target continue a prompt set (once per pass) and keep the continuations as "
        "compressed token ids in parts under a size limit, for spec-train --corpus. Resumable: "
        "rerun the same command to continue."))
    a = p.add_argument
    a("model_dir", type=Path, help="Hugging Face Llama checkpoint directory (with tokenizer)")
    a("--out", type=Path, required=True, help="corpus directory to write (or continue)")
    a("--prompts", type=Path, default=DEFAULT_WIDE_PROMPTS,
      help="JSON-lines prompt file (default: the packaged wide training set, "
           f"{DEFAULT_WIDE_PROMPTS.name}: 2.8x the training split's prompts)")
    a("--passes", type=int, default=1, help="continuations of every prompt (default 1); may grow "
                                            "on a rerun")
    a("--temperature", type=temperatures, default=(0.0,),
      help="sampling temperature per pass (default 0: greedy); a comma list (e.g. 0,0.7,1.0) is "
           "used in order, then its sampling temperatures cycle (a repeated greedy pass would "
           "only copy the first)")
    a("--max-new-tokens", type=int, default=192, help="continuation length per prompt (default 192)")
    a("--max-prompt-tokens", type=int, default=512, help="prompts are cut to their last N tokens")
    a("--gen-batch", type=int, default=64, help="prompts the target continues at once (default 64)")
    a("--part-mb", type=float, default=15.0, help="largest part file, MiB (default 15)")
    a("--seed", type=int, default=0, help="sampling seed (default 0)")
    a("--device", choices=("cpu", "cuda"), default="cpu")
    a("--target-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="the target's weights (default auto: bfloat16 on cuda, float32 on cpu)")
    a("--time-limit", type=float, default=None,
      help="stop after the generation batch in flight once this many seconds have passed")
    a("--shard", type=shard_arg, default=(0, 1), metavar="I/N",
      help="make only generation batches k with k %% N == I (one shard per GPU, each in its own "
           "--out); `spec-corpus merge` joins the N shards into the corpus one run would make")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return add_verbose_flag(p)


# ---------------------------------------------------------------- encoding

def token_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 4


def encode_frame(seqs: list[Sequence], batch: int, width: int) -> bytes:
    """One frame: `seqs` (with prompt_index set) as compressed token ids."""
    meta = np.array([[s.prompt_index, s.prompt_len, s.n_new] for s in seqs], dtype="<u4").T
    ended = np.array([s.ended for s in seqs], dtype="u1")
    ids = np.concatenate([s.tokens.numpy() for s in seqs]).astype("<u2" if width == 2 else "<u4")
    payload = b"".join((_HEAD.pack(_BLOCK, len(seqs), width, batch), meta.tobytes(), ended.tobytes(),
                        ids.tobytes()))
    block = lzma.compress(payload, preset=6)
    return _FRAME + struct.pack("<I", len(block)) + block


def decode_frames(data: bytes, where: str) -> list[tuple[int, list[Sequence]]]:
    """A part's bytes -> [(batch index, sequences)]; a malformed part is a SpecCompileError."""
    return [(batch, seqs) for _, batch, seqs in split_frames(data, where)]


def split_frames(data: bytes, where: str) -> list[tuple[bytes, int, list[Sequence]]]:
    """A part's bytes -> [(the frame's own bytes, batch index, sequences)]; a malformed part is a
    SpecCompileError."""
    out, off = [], 0
    try:
        while off < len(data):
            if data[off:off + 4] != _FRAME:
                raise ValueError(f"no frame at byte {off}")
            (n,) = struct.unpack_from("<I", data, off + 4)
            payload = lzma.decompress(data[off + 8:off + 8 + n])
            frame = data[off:off + 8 + n]
            off += 8 + n
            magic, k, width, batch = _HEAD.unpack_from(payload)
            if magic != _BLOCK or width not in (2, 4):
                raise ValueError("unknown block")
            o = _HEAD.size
            meta = np.frombuffer(payload, "<u4", 3 * k, o).reshape(3, k).astype(np.int64)
            ended = np.frombuffer(payload, "u1", k, o + 12 * k)
            lens = meta[1] + meta[2]
            ids = np.frombuffer(payload, "<u2" if width == 2 else "<u4", int(lens.sum()), o + 13 * k)
            if o + 13 * k + ids.nbytes != len(payload):
                raise ValueError("block size")
            ids = torch.from_numpy(ids.astype(np.int64))
            starts = np.concatenate(([0], np.cumsum(lens)))
            out.append((frame, batch, [Sequence(ids[starts[i]:starts[i + 1]].clone(), None, int(meta[1, i]),
                                                bool(ended[i]), int(meta[0, i])) for i in range(k)]))
    except (ValueError, lzma.LZMAError, struct.error) as e:
        raise SpecCompileError(f"{where}: not a corpus part ({brief(e)}); restore it (e.g. from git) "
                               "or regenerate the corpus") from None
    return out


# ---------------------------------------------------------------- reading

def read_index(corpus_dir: Path, what: str = "--corpus") -> dict:
    fix = "restore it (e.g. from git) or regenerate the corpus with spec-corpus"
    index = read_json_object(Path(corpus_dir) / INDEX, what, hint=f"is {corpus_dir} a spec-corpus "
                             "directory? create one with spec-corpus", fix=fix)
    ok = (index.get("format") == FORMAT and isinstance(index.get("parts"), list)
          and all(isinstance(index.get(k), dict) for k in ("model", "prompts", "settings", "totals"))
          and all(isinstance(index[k].get(f), str) for k, f in (("model", "config_sha256"),
                  ("model", "weights_sha256"), ("prompts", "sha256")))
          and isinstance(index.get("batches_done"), int)
          and all(isinstance(p, dict) and isinstance(p.get("file"), str) and _PART.match(p["file"])
                  and isinstance(p.get("bytes"), int) and isinstance(p.get("sha256"), str)
                  and all(isinstance(p.get(k), int) for k in ("n_sequences", "n_tokens", "n_new"))
                  for p in index["parts"]))
    if not ok:
        raise SpecCompileError(f"{what}: {Path(corpus_dir) / INDEX} is not a {FORMAT} index; {fix}")
    return index


def read_part(corpus_dir: Path, part: dict, what: str = "--corpus") -> bytes:
    """A part's bytes, checked against its index entry (size and sha256)."""
    return read_recorded(Path(corpus_dir) / part["file"], part["bytes"], part["sha256"], what, "corpus part",
                         INDEX, "restore it (e.g. git checkout) or regenerate the corpus with spec-corpus")


def read_corpus(corpus_dir: str | Path, what: str = "--corpus") -> list[Sequence]:
    """Every sequence of a corpus, in order (features None, prompt_index set), each part
    verified against the index; a missing or corrupt part is a one-line SpecCompileError."""
    corpus_dir = Path(corpus_dir)
    out = []
    for part in read_index(corpus_dir, what)["parts"]:
        for _, seqs in decode_frames(read_part(corpus_dir, part, what), f"{what}: {corpus_dir / part['file']}"):
            out += seqs
    return out


def pass_temperature(temps: tuple[float, ...], p: int) -> float:
    """Pass p's temperature: the list in order, then cycling over its sampling temperatures only.
    Greedy decoding continues a prompt the same way every time, so a second greedy pass would
    add an exact copy, not data (`--passes 24 --temperature 0,0.7,1.0`: one greedy pass, then
    0.7 and 1.0 in turn). A list of greedy only cycles as given."""
    if p < len(temps):
        return temps[p]
    sampled = [t for t in temps if t > 0] or list(temps)
    return sampled[(p - len(temps)) % len(sampled)]


def corpus_sha256(index: dict) -> str:
    """One digest of a corpus's contents: its parts' sha256s in order."""
    return hashlib.sha256("".join(p["sha256"] for p in index["parts"]).encode()).hexdigest()


def is_val_prompt(prompt_index: int, frac: float) -> bool:
    """Whether a prompt (its row in the corpus's prompt file) is held out for validation: a hash
    of the row, so the split is fixed, needs no state, and takes every pass of a prompt together."""
    h = hashlib.sha256(f"spec-corpus-val:{prompt_index}".encode()).digest()
    return int.from_bytes(h[:8], "big") < frac * (1 << 64)


def split_by_prompt(seqs: list[Sequence], frac: float) -> tuple[list[Sequence], list[Sequence]]:
    """(training, validation) sequences: validation holds every sequence of a held-out prompt."""
    train, val = [], []
    for s in seqs:
        (val if is_val_prompt(s.prompt_index, frac) else train).append(s)
    return train, val


# ---------------------------------------------------------------- writing

def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p) % (1 << 62)
    return s


def _check_args(args) -> None:
    for flag in ("passes", "max_new_tokens", "max_prompt_tokens", "gen_batch"):
        if getattr(args, flag) <= 0:
            raise SpecCompileError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive integer")
    if not args.part_mb > 0:
        raise SpecCompileError(f"--part-mb {args.part_mb}: must be positive")
    if args.time_limit is not None and not args.time_limit > 0:
        raise SpecCompileError(f"--time-limit {args.time_limit}: must be positive")
    if args.threads is not None and args.threads <= 0:
        raise SpecCompileError(f"--threads {args.threads}: must be a positive integer")
    if not args.model_dir.is_dir():
        raise SpecCompileError(f"MODEL_DIR {args.model_dir}: no such directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SpecCompileError("--device cuda: no CUDA device is available; use --device cpu")
    if args.out.exists() and not args.out.is_dir():
        raise SpecCompileError(f"--out {args.out}: not a directory; choose another path")


def _shape(args) -> dict:
    shape = {"temperature": list(args.temperature), "max_new_tokens": args.max_new_tokens,
             "max_prompt_tokens": args.max_prompt_tokens, "gen_batch": args.gen_batch, "seed": args.seed,
             "target_dtype": target_dtype(args), "part_mb": args.part_mb}
    if args.shard[1] > 1:  # recorded only for a shard: a merged corpus equals an unsharded one
        shape["shard"] = list(args.shard)
    return shape


def _check_same(index: dict, model: dict, prompts: dict, shape: dict, passes: int, out: Path) -> None:
    """An existing corpus continues only with the model, prompts and settings it was made with."""
    if (index["model"]["config_sha256"], index["model"]["weights_sha256"]) != \
            (model["config_sha256"], model["weights_sha256"]):
        raise SpecCompileError(f"--out {out} holds a corpus of another model ({index['model']['dir']}); "
                               "pass that MODEL_DIR, or choose another --out")
    if index["prompts"]["sha256"] != prompts["sha256"]:
        raise SpecCompileError(f"--out {out} holds a corpus of other prompts ({index['prompts']['path']}); "
                               "pass that --prompts file, or choose another --out")
    for k in SHAPE_KEYS:
        if index["settings"].get(k) != shape.get(k):
            old = index["settings"].get(k)
            if k == "shard":
                old = "/".join(map(str, old)) if old else "(none: an unsharded corpus)"
            elif isinstance(old, list):
                old = ",".join(map(str, old))
            raise SpecCompileError(f"--out {out} holds a corpus made with --{k.replace('_', '-')} {old}, "
                                   "this run differs; use the same settings, or choose another --out")
    if passes < index["settings"]["passes"]:
        raise SpecCompileError(f"--passes {passes}: {out} already holds {index['settings']['passes']} "
                               "passes; pass at least that many (a corpus only grows)")


def _recover(out: Path, index: dict) -> None:
    """Undo what a crash left past the index: bytes past a part's recorded end (the newest part
    is rewritten with a batch appended before the index records it) and unrecorded files."""
    named = {p["file"] for p in index["parts"]}
    for f in out.iterdir():
        if f.name.startswith("part-") and f.name not in named:
            f.unlink()  # a part written for a batch the index never recorded
        elif f.name.startswith((".part-", f".{INDEX}.tmp-")):
            f.unlink()  # a temporary of an interrupted atomic write
    for p in index["parts"]:
        path = out / p["file"]
        if path.is_file() and path.stat().st_size > p["bytes"]:
            with open(path, "rb") as f:
                head = f.read(p["bytes"])
            if hashlib.sha256(head).hexdigest() == p["sha256"]:
                atomic_write_bytes(path, head)
        read_part(out, p, "--out")


def _pack(out: Path, frames: list[bytes], index: dict, limit: int, meta: list[dict]) -> dict[str, bytes]:
    """Place a batch's frames: appended to the newest part while they fit, else new parts.
    Updates the index's part entries; returns the new bytes of every part touched."""
    touched: dict[str, bytes] = {}
    parts = index["parts"]
    for frame, m in zip(frames, meta):
        last = parts[-1] if parts else None
        if last is not None and last["bytes"] + len(frame) <= limit:
            old = touched.get(last["file"])
            if old is None:
                old = read_part(out, last, "--out")
            data = old + frame
        else:
            last = {"file": f"part-{len(parts):05d}.bin", "sha256": "", "bytes": 0, "n_sequences": 0,
                    "n_tokens": 0, "n_new": 0, "batches": [m["batch"], m["batch"]]}
            parts.append(last)
            data = frame
        touched[last["file"]] = data
        last.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                    n_sequences=last["n_sequences"] + m["n"], n_tokens=last["n_tokens"] + m["tokens"],
                    n_new=last["n_new"] + m["new"])
        last["batches"][1] = m["batch"]
    return touched


def _frames(seqs: list[Sequence], batch: int, width: int, limit: int) -> tuple[list[bytes], list[dict]]:
    """A batch as frames of at most `limit` bytes: one if it fits, else halves, recursively."""
    frame = encode_frame(seqs, batch, width)
    if len(frame) <= limit:
        return [frame], [{"batch": batch, "n": len(seqs), "tokens": sum(len(s.tokens) for s in seqs),
                          "new": sum(s.n_new for s in seqs)}]
    if len(seqs) == 1:
        raise SpecCompileError(f"--part-mb: one sequence takes {len(frame)} bytes compressed, more "
                               f"than a part of {limit} bytes; raise --part-mb")
    a, ma = _frames(seqs[:len(seqs) // 2], batch, width, limit)
    b, mb = _frames(seqs[len(seqs) // 2:], batch, width, limit)
    return a + b, ma + mb


def _totals(parts: list[dict]) -> dict:
    return {k: sum(p[k] for p in parts) for k in ("n_sequences", "n_tokens", "n_new")} | {
        "bytes": sum(p["bytes"] for p in parts)}


def _write_index(out: Path, index: dict) -> None:
    atomic_write_text(out / INDEX, json.dumps(index, indent=1) + "\n")


def make_corpus(args, command: str) -> dict:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    rows = read_prompts(args.prompts)
    model = {"dir": record_path(args.model_dir), "config_sha256": sha256_file(args.model_dir / "config.json"),
             "weights_sha256": weights_sha256(args.model_dir)}
    prompts = {"path": record_path(args.prompts), "sha256": sha256_file(args.prompts), "n_prompts": len(rows)}
    shape = _shape(args)
    out = args.out
    existing = read_index(out, "--out") if (out / INDEX).is_file() else None
    if existing is not None:
        _check_same(existing, model, prompts, shape, args.passes, out)
    elif out.is_dir() and any(out.iterdir()):
        raise SpecCompileError(f"--out {out} is not empty and holds no {INDEX}; choose an empty or new directory")
    with output_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        if existing is not None:
            _recover(out, existing)
        return _generate(args, command, out, existing, rows, model, prompts, shape, t_start)


def _generate(args, command, out, index, rows, model, prompts, shape, t_start) -> dict:
    dev = torch.device(args.device)
    G = args.gen_batch
    per_pass = -(-len(rows) // G)
    total = per_pass * args.passes
    greedy = [p for p in range(args.passes) if pass_temperature(args.temperature, p) == 0]
    if len(greedy) > 1:
        print(f"note: passes {', '.join(map(str, greedy[1:]))} are greedy again: exact copies of pass "
              f"{greedy[0]}'s continuations; add a sampling temperature for new data", file=sys.stderr)
    shard, n_shards = args.shard
    # the batches this run makes: k % N == I (all of them unsharded); batches_done is the next
    # batch position, so a shard's index says how far along the whole plan it has come
    mine = [k for k in range(index["batches_done"] if index else 0, total) if k % n_shards == shard]
    done = index["batches_done"] if index else 0
    if index is None and not mine:
        raise SpecCompileError(f"--shard {shard}/{n_shards}: the plan has only {total} generation batches, "
                               f"none for this shard; use at most {total} shards")
    if index is not None and not mine:
        print(f"corpus {out}: complete ({done} batches, {index['totals']['n_new']} new tokens in "
              f"{len(index['parts'])} parts); nothing to do", file=sys.stderr)
        return index
    from ..loading import load_target

    target = load_target(args.model_dir, target_dtype(args)).to(dev)
    ids = encode_prompts(rows, load_tokenizer(args.model_dir), target.cfg.vocab_size, args.prompts,
                         args.max_prompt_tokens)
    width = token_bytes(target.cfg.vocab_size)
    if index is None:
        index = {"format": FORMAT, "model": model, "prompts": prompts,
                 "settings": {"passes": args.passes, **shape}, "vocab_size": target.cfg.vocab_size,
                 "token_bytes": width, "eos_token_ids": sorted(target.cfg.eos_token_ids),
                 "batches_per_pass": per_pass, "batches_done": 0, "complete": False, "parts": [],
                 "totals": _totals([]), "time": {"generate_s": 0.0}, "runs": []}
    index["settings"]["passes"] = args.passes
    # which command made which batches, where (a corpus may be continued on another machine)
    run = {"command": command, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "target_dtype": target_dtype(args), "torch": torch.__version__, "batches": [mine[0], mine[0]],
           "generate_s": 0.0}
    index["runs"].append(run)
    limit = int(args.part_mb * (1 << 20))
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # little padding per batch
    eos = target.cfg.eos_token_ids
    for j, k in enumerate(mine):
        t0 = time.time()
        p, b = divmod(k, per_pass)
        pids = order[b * G:(b + 1) * G]
        temp = pass_temperature(args.temperature, p)
        gen = torch.Generator(dev).manual_seed(_seed(args.seed, k, 1))
        seqs = continue_prompts(target, [ids[i] for i in pids], args.max_new_tokens, eos, temp, gen)
        for s, i in zip(seqs, pids):
            s.prompt_index = i
        frames, meta = _frames(seqs, k, width, limit)
        for name, data in _pack(out, frames, index, limit, meta).items():
            atomic_write_bytes(out / name, data)
        done = k + 1
        dt = time.time() - t0
        index["batches_done"] = done
        index["complete"] = j == len(mine) - 1
        index["totals"] = _totals(index["parts"])
        index["time"]["generate_s"] = round(index["time"]["generate_s"] + dt, 1)
        run["batches"][1], run["generate_s"] = k, round(run["generate_s"] + dt, 1)
        _write_index(out, index)  # the commit point of this batch
        new = sum(m["new"] for m in meta)
        print(f"corpus batch {done}/{total}{f' (shard {shard}/{n_shards})' if n_shards > 1 else ''} "
              f"(pass {p}, T {temp:g}): {len(pids)} prompts, {new} new "
              f"tokens in {dt:.0f}s ({new / max(dt, 1e-9):.1f} tok/s); {len(index['parts'])} parts, "
              f"{index['totals']['bytes'] / (1 << 20):.2f} MiB", file=sys.stderr, flush=True)
        if not index["complete"] and args.time_limit is not None and time.time() - t_start >= args.time_limit:
            print(f"stopped by --time-limit after batch {done}/{total}: rerun the same command to "
                  "continue", file=sys.stderr)
            break
    else:
        print(f"wrote {out}: {index['totals']['n_sequences']} sequences, {index['totals']['n_new']} new "
              f"tokens, {len(index['parts'])} parts", file=sys.stderr)
    return index


# ---------------------------------------------------------------- merging shards

def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-corpus merge", description=(
        "Join the N shards of one corpus (spec-corpus --shard I/N, each in its own directory) into "
        "the corpus one unsharded run would make: the same parts, bytes and index. Shards that "
        "stopped at different points give the batches every shard has reached; continue the "
        "result with spec-corpus (unsharded), or the shards, and merge again."))
    p.add_argument("shards", type=Path, nargs="+", help="the shard directories, all N of them")
    p.add_argument("--out", type=Path, required=True, help="new corpus directory to write")
    return add_verbose_flag(p)


def merge_shards(shards: list[Path], out: Path) -> dict:
    """Shards -> one corpus in `out` (new or empty): batches 0 .. m-1, m the first batch no shard
    holds; the parts are the frames repacked in batch order, byte-identical to an unsharded run's."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecCompileError(f"--out {out} exists and is not an empty directory; choose a new one")
    indexes = [read_index(d, "shard") for d in shards]
    keys = [tuple(i["settings"].get("shard") or (0, 1)) for i in indexes]
    n = keys[0][1]
    if n < 2 or any(k[1] != n for k in keys) or sorted(k[0] for k in keys) != list(range(n)):
        got = ", ".join(f"{d} ({'/'.join(map(str, k)) if k[1] > 1 else 'unsharded'})" for d, k in zip(shards, keys))
        raise SpecCompileError(f"merge: expected the {n if n > 1 else 'N'} shards 0/N .. N-1/N of one corpus, got {got}; "
                               "pass every shard's directory once")
    first = indexes[0]

    def same(i):
        return {k: i[k] for k in ("format", "model", "prompts", "vocab_size", "token_bytes", "eos_token_ids",
                                  "batches_per_pass")} | {
            "settings": {k: v for k, v in i["settings"].items() if k != "shard"}}

    ref = same(first)  # what every shard must share, and the merged index's base
    for d, i in zip(shards, indexes):
        x = same(i)
        if x != ref:
            diff = sorted({k for k in x if k != "settings" and x[k] != ref[k]} | {
                f"--{k.replace('_', '-')}" for k in x["settings"].keys() | ref["settings"].keys()
                if x["settings"].get(k) != ref["settings"].get(k)})
            raise SpecCompileError(f"merge: shard {d} differs from {shards[0]} in {', '.join(diff)} "
                                   "(another model, prompt file or setting); merge shards of one corpus")
    frames: dict[int, list[tuple[bytes, dict]]] = {}
    for d, i in zip(shards, indexes):
        for part in i["parts"]:
            for frame, batch, seqs in split_frames(read_part(d, part, "shard"), f"shard: {d / part['file']}"):
                frames.setdefault(batch, []).append((frame, {
                    "batch": batch, "n": len(seqs), "tokens": sum(len(q.tokens) for q in seqs),
                    "new": sum(q.n_new for q in seqs)}))
    m = 0
    while m in frames:
        m += 1
    if m == 0:
        raise SpecCompileError(f"merge: no shard holds batch 0 (shard 0/{n} has made none yet); run the "
                               "shards further, then merge")
    dropped = sorted(k for k in frames if k >= m)
    total = first["batches_per_pass"] * first["settings"]["passes"]
    index = ref | {"batches_done": m, "complete": m == total, "parts": [], "totals": _totals([]),
                           "time": {"generate_s": round(sum(i["time"]["generate_s"] for i in indexes), 1)},
                           "runs": [r | {"shard": k[0]} for i, k in zip(indexes, keys) for r in i["runs"]]}
    # the same key order as an unsharded run's index
    index = {k: index[k] for k in ("format", "model", "prompts", "settings", "vocab_size", "token_bytes",
                                   "eos_token_ids", "batches_per_pass", "batches_done", "complete", "parts",
                                   "totals", "time", "runs")}
    limit = int(first["settings"]["part_mb"] * (1 << 20))
    ordered = [fm for k in range(m) for fm in frames[k]]
    with atomic_dir(out) as tmp:  # all or nothing: an interrupted merge leaves no OUT
        for name, b in _pack(tmp, [f for f, _ in ordered], index, limit, [mm for _, mm in ordered]).items():
            (tmp / name).write_bytes(b)
        index["totals"] = _totals(index["parts"])
        _write_index(tmp, index)
    print(f"merged {len(shards)} shards into {out}: batches 0-{m - 1} of {total}"
          f"{' (complete)' if m == total else ''}, {index['totals']['n_new']} new tokens, "
          f"{len(index['parts'])} parts", file=sys.stderr)
    if dropped:
        print(f"note: {len(dropped)} batches past batch {m - 1} (the first a shard lacks is {m}) are "
              "left out; continue the shards and merge again to keep them", file=sys.stderr)
    return index


@cli_entry(interrupted="interrupted: rerun the same command to continue (finished batches are kept)")
def main(argv: list[str] | None = None) -> int:
    from .options import command_line

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        a = merge_parser().parse_args(argv[1:])
        merge_shards(a.shards, a.out)
        return 0
    args = parser().parse_args(argv)
    make_corpus(args, command=command_line("spec-corpus", argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
