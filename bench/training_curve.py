"""Draft quality against training data size, from the training.json of drafts trained on growing
`--corpus-tokens` subsets of one corpus (nested: each subset holds the smaller ones) and scored
on the development prompts (`--eval-prompts`): the data-size curve of docs/training.md.

Per draft: the corpus's new tokens it trained on (data size), tokens seen (reuse counted), wall
time, the best validation loss and top-1, and the development top-1 and chain-5 tokens per call
(the offline proxy; engine-measured tokens per call come from bench_acceptance.py). A draft
trained online (no corpus) is a point at its generated tokens. Writes JSON (--out), prints a
table, and draws a PNG next to it (skipped without matplotlib).

    python bench/training_curve.py drafts/smollm2-wide-1x drafts/smollm2-wide-3x drafts/smollm2-wide-10x \
        --out bench/results/training_curve.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def point(draft_dir: Path) -> dict:
    """One draft's row, from its training.json (DRAFT_DIR/training.json, or that file itself when
    only the record was kept; a missing or foreign file: SystemExit naming it)."""
    path = draft_dir if draft_dir.suffix == ".json" else draft_dir / "training.json"
    try:
        t = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a spec-train training.json ({e}); train the draft with spec-train")
    fm, dev, val = t.get("final_metrics", {}), t.get("dev_eval") or {}, t.get("validation") or {}
    data = fm.get("corpus_tokens_used", fm.get("generated_tokens"))
    if data is None:
        raise SystemExit(f"{path}: records no data size (final_metrics.corpus_tokens_used or generated_tokens)")
    best = val.get("best") or {}
    chain = dev.get("chain_tokens_per_call") or [None]
    return {"draft": str(draft_dir), "arch": t.get("draft", {}).get("arch"), "data_tokens": data,
            "tokens_seen": fm.get("tokens_seen"), "wall_s": (t.get("time") or {}).get("wall_s"),
            "stop_reason": t.get("stop_reason"), "val_loss": best.get("loss"), "val_top1": best.get("acc"),
            "dev_top1": dev.get("top1"), "dev_chain_tpc": chain[-1], "dev_prompts": dev.get("n_prompts"),
            # validation top-1 as training went on: whether data or training compute limits a point
            "val_history": [[h["tokens_seen"], h["acc"]] for h in val.get("history", []) if "acc" in h]}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", type=Path, help="draft directories (with training.json)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/training_curve.json"))
    args = ap.parse_args(argv)
    rows = sorted((point(d) for d in args.drafts), key=lambda r: r["data_tokens"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"points": rows}, indent=1) + "\n")
    print("draft | data tokens | tokens seen | wall s | stop | val loss | val top-1 | dev top-1 | dev chain-5 tokens/call")
    for r in rows:
        print(f"{r['draft']} | {r['data_tokens']:,} | {_fmt(r['tokens_seen'], ',')} | {_fmt(r['wall_s'], '.0f')} | "
              f"{r['stop_reason'] or '-'} | {_fmt(r['val_loss'], '.4f')} | {_fmt(r['val_top1'], '.3f')} | "
              f"{_fmt(r['dev_top1'], '.3f')} | {_fmt(r['dev_chain_tpc'], '.3f')}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("(no matplotlib: no PNG)", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    x = [r["data_tokens"] for r in rows]
    for key, label, a in (("dev_top1", "dev top-1", ax[0]), ("val_top1", "validation top-1", ax[0]),
                          ("dev_chain_tpc", "dev chain-5 tokens/call", ax[1])):
        pts = [(xi, r[key]) for xi, r in zip(x, rows) if r[key] is not None]
        if pts:
            a.plot(*zip(*pts), marker="o", label=label)
    for xi, r in zip(x, rows):  # what each point trained for
        if r["dev_top1"] is not None and r["tokens_seen"]:
            ax[0].annotate(f"{r['tokens_seen'] / 1e6:.1f}M seen", (xi, r["dev_top1"]), fontsize=8,
                           textcoords="offset points", xytext=(4, -12))
    for a in ax[:2]:
        a.set_xscale("log")
        a.set_xlabel("training data (corpus new tokens)")
    for r in rows:
        if r["val_history"]:
            ax[2].plot(*zip(*r["val_history"]), label=f"{r['data_tokens'] / 1e6:.1f}M data")
    ax[2].set_xscale("log")
    ax[2].set_xlabel("tokens seen (reuse counted)")
    ax[2].set_ylabel("validation top-1")
    for a in ax:
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels at the decades only
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    png = args.out.with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
