"""Text -> prompt token ids, the one way: the checkpoint's chat template when it has one (a single
user turn, generation prompt added), else the plain tokenizer. Used by `spec-run`/`Engine`,
training data and evaluation alike, so every path sees the same prompts."""

from __future__ import annotations


def encode_user_prompt(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (a mapping); 4 returned the list itself.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer(text)["input_ids"])
