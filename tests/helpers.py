"""Test helpers: build engines in-process, transformers' greedy reference, an oracle draft."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spec_compiler.config import CompileConfig, DraftConfig, ModelConfig
from spec_compiler.loading import load_draft, load_target
from spec_compiler.pipeline import compile_engine
from spec_compiler.trees import resolve_tree


def build_engine(out: Path, model_dir: Path, *, tree: str = "mc_sim_7b_63", draft_dir: Path | None = None,
                 backend: str = "eager", max_seq_len: int = 256, chunk: int = 16,
                 draft_module: nn.Module | None = None, draft_cfg: DraftConfig | None = None) -> Path:
    model = ModelConfig.from_hf(model_dir)
    t = resolve_tree(tree)
    if draft_cfg is None and draft_dir is not None:
        draft_cfg = load_draft(draft_dir, load_target(model_dir)).cfg
    cfg = CompileConfig(model=model, draft=draft_cfg if t.n_nodes > 1 else None, tree=t,
                        max_seq_len=max_seq_len, backend=backend, prefill_chunk=chunk)
    return compile_engine(cfg, model_dir, draft_dir if t.n_nodes > 1 else None, out,
                          progress=lambda s: None, draft_module=draft_module)


_HF_CACHE: dict = {}


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, eos=None) -> list[int]:
    """transformers' generate(do_sample=False) with a fresh generation config (no processors)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    key = str(model_dir)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = _HF_CACHE[key]
    if eos is None:
        eos = list(ModelConfig.from_hf(model_dir).eos_token_ids)
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                          pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=gc)
    return out[0, len(prompt):].tolist()


class OracleDraft(nn.Module):
    """A test-only draft that knows the target's greedy continuation `seq` (prompt + output).

    The pair at rotary position p predicts seq[p + 2]; this draft ranks that token at
    `rank_of(p)` among its top-k (so a branch other than the first is right), except at
    `poisoned(p)` positions, where every top-k token is wrong. It keeps the real draft's layers
    (attention included, so every pass applies) and overrides only the logits.
    """

    def __init__(self, inner: nn.Module, seq: list[int], capacity: int, vocab: int, rank_of, poisoned):
        super().__init__()
        self.inner = inner
        table = torch.zeros(capacity, vocab)
        for p in range(capacity):
            true = seq[p + 2] if p + 2 < len(seq) else 0
            decoys = [t for t in range(vocab) if t != true][:8]
            table[p, decoys] = torch.arange(8, 0, -1, dtype=torch.float32) + 10  # 18, 17, ...
            table[p, true] = -10.0 if poisoned(p) else 18.0 - rank_of(p) + 0.5
        self.register_buffer("table", table)

    def forward(self, tokens, features, input_pos, cache_len, *kv):
        logits, x, *new_kv = self.inner(tokens, features, input_pos, cache_len, *kv)
        return (logits * 0 + F.embedding(input_pos, self.table), x, *new_kv)


def expected_emitted(tree, prompt_len: int, n_steps: int, rank_of, poisoned) -> list[int]:
    """Independent model of greedy acceptance with the oracle draft: tokens emitted per step."""
    children = {}
    for n in range(1, tree.n_nodes):
        children[(tree.parent[n], tree.rank[n])] = n
    L, out = prompt_len, []
    for _ in range(n_steps):
        node, d = 0, 0
        while True:
            p = L + d - 1  # the rotary position of the current node's draft pair
            if poisoned(p) or (node, rank_of(p)) not in children:
                break
            node, d = children[(node, rank_of(p))], d + 1
        out.append(d + 1)
        L += d + 1
    return out
