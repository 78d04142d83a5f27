"""`spec-train`: EAGLE draft heads by online distillation from a live target.

    data.py      prompt file (jsonl) -> token ids (chat template applied)
    corpus.py    `spec-corpus`: the target's continuations made once, as compressed token ids in parts
    generate.py  the target continues each prompt itself, batched; returns tokens + features
    distill.py   training forward of the draft (teacher forcing on the target's features) + loss
    evaluate.py  offline proxies: draft top-1 accuracy and chain acceptance on target continuations
    checkpoint.py  atomic, resumable checkpoints (draft, optimizer, RNG, cursor, current batch), in parts
    save.py      the trained head in the EAGLE-1/2 reference format, swapped in atomically
    options.py   flag checks, the settings a resume must share, what training.json records
    loop.py      the loop: generate (or draw from a corpus) a batch, a few optimizer passes over it, repeat
    cli.py       argparse -> the loop
    fit_tree.py  `spec-fit-tree`: the static tree that suits a draft
"""
