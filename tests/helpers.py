"""Test helpers: build engines in-process, transformers' greedy reference, an oracle draft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spec_compiler.config import CompileConfig, DraftConfig, ModelConfig
from spec_compiler.loading import load_draft, load_target
from spec_compiler.pipeline import compile_engine
from spec_compiler.trees import resolve_tree

# name -> LlamaConfig overrides. All fp32, 2 layers, vocab 128: fast, and decisive enough logits
# (initializer_range 0.3) that greedy argmax is far from ties.
TINY_CONFIGS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                        tie_word_embeddings=False, eos_token_id=[5, 7],
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                         "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
}


# A reduced draft vocabulary for the tiny models: 48 of the 128 ids in a shuffled ("frequency")
# order, so logit columns, sorted ids and target ids all differ.
HOT_IDS = torch.randperm(128, generator=torch.Generator().manual_seed(7))[:48].tolist()


def make_tiny_checkpoint(out: Path, name: str = "gqa_untied", seed: int = 0, **over) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              initializer_range=0.3, eos_token_id=2, bos_token_id=1, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(TINY_CONFIGS[name])
    kw.update(over)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(out)
    return out


def make_random_draft(out: Path, target_dir: Path, n_layers: int = 1, seed: int = 1,
                      hot_ids: list[int] | torch.Tensor | None = None) -> Path:
    """A random EAGLE head; `hot_ids` (target ids, most frequent first) gives it a reduced vocabulary."""
    from spec_compiler.config import DraftConfig
    from spec_compiler.loading import load_target
    from spec_compiler.models.eagle import EagleDraft
    from spec_compiler.train.save import save_draft

    target = load_target(target_dir)
    cfg = DraftConfig(n_layers=n_layers, fc_bias=True, has_embed=False, layer=target.cfg)
    torch.manual_seed(seed)
    draft = EagleDraft(cfg, target.cfg)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)
    save_draft(draft, out, dtype=torch.float32,
               hot_ids=None if hot_ids is None else torch.as_tensor(hot_ids, dtype=torch.long))
    return out


def copy_draft(src: Path, dst: Path, edit_state=None, **config) -> Path:
    """A copy of draft dir `src` at `dst`, `edit_state(state_dict)` applied in place to its
    model.safetensors and config.json fields set (None deletes one): for bad-input tests."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_state is not None:
        st = load_file(dst / "model.safetensors")
        edit_state(st)
        save_file({k: v.contiguous() for k, v in st.items()}, str(dst / "model.safetensors"))
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            cfg.pop(k) if v is None else cfg.update({k: v})
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def d2t_of(hot_ids: list[int]) -> torch.Tensor:
    """EAGLE-3's d2t for a hot list: target id = index + d2t[index]."""
    return torch.tensor(hot_ids) - torch.arange(len(hot_ids))


def build_engine(out: Path, model_dir: Path, *, tree: str = "mc_sim_7b_63", draft_dir: Path | None = None,
                 backend: str = "eager", max_seq_len: int = 256, chunk: int = 16,
                 draft_module: nn.Module | None = None, draft_cfg: DraftConfig | None = None,
                 device: str = "cpu", dtype: str = "float32", draft_vocab: str | int = "auto",
                 sampling: bool = True, max_batch: int = 1, bucket_trees: list[str] | None = None,
                 jobs: int | None = None, tp: int = 1, tp_lm_head: str = "replicated") -> Path:
    """`bucket_trees`: one tree per batch bucket (what --tree auto may choose) instead of `tree`."""
    from spec_compiler.pipeline import with_bucket_trees

    model = ModelConfig.from_hf(model_dir)
    trees = tuple(resolve_tree(t) for t in (bucket_trees or [tree]))
    spec = any(t.n_nodes > 1 for t in trees)
    if draft_cfg is None and draft_dir is not None:
        draft_cfg = load_draft(draft_dir, load_target(model_dir), draft_vocab=draft_vocab).cfg
    cfg = CompileConfig(model=model, draft=draft_cfg if spec else None, tree=trees[0],
                        max_seq_len=max_seq_len, backend=backend, prefill_chunk=chunk,
                        device=device, dtype=dtype, sampling=sampling, batch_size=max_batch, tp=tp,
                        tp_lm_head=tp_lm_head)
    if bucket_trees is not None:
        cfg = with_bucket_trees(cfg, trees)
    return compile_engine(cfg, model_dir, draft_dir if spec else None, out, progress=lambda s: None,
                          draft_module=draft_module, draft_vocab=draft_vocab, jobs=jobs)


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
    (attention included, so every pass applies) and overrides only the logits. With a reduced
    vocabulary (`inner.hot_ids`) the logits are the table's hot columns: a token that is not
    hot cannot be proposed, and ranks hold as long as the decoys 0..8 are hot.
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
        if self.hot_ids is not None:
            table = table[:, self.hot_ids]
        self.register_buffer("table", table)

    @property
    def hot_ids(self):
        return getattr(self.inner, "hot_ids", None)

    def forward(self, tokens, features, input_pos, cache_len, *kv):
        logits, x, *new_kv = self.inner(tokens, features, input_pos, cache_len, *kv)
        return (logits * 0 + F.embedding(input_pos, self.table), x, *new_kv)


def oracle_hot_ids(n_extra: int = 80, seed: int = 11) -> list[int]:
    """A hot set for OracleDraft on the tiny models: its decoys 0..8 (so its ranks hold) and
    n_extra other ids, in shuffled order (columns are not ids)."""
    rest = [t for t in torch.randperm(128, generator=torch.Generator().manual_seed(seed)).tolist() if t > 8]
    ids = list(range(9)) + rest[:n_extra]
    return [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed + 1))]


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


def with_eos(src, dst, eos):
    """A copy of checkpoint `src` whose EOS ids (config and generation config) are `eos`; with
    None it has none, so generation can only stop at max-new-tokens or the context limit."""
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((dst / name).read_text())
        cfg["eos_token_id"] = eos
        (dst / name).write_text(json.dumps(cfg))
    return dst


TINY_WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "hello", "world", "the", "sea", "is",
              "blue", "can", "you", "write", "one", "short", "sentence", "about", "!", "?"]


def add_tiny_tokenizer(model_dir: Path, chat_template: str | None = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}")) -> Path:
    """Write a word-level tokenizer (ids < 20, so within the tiny models' 128) with a chat
    template into `model_dir`: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(model_dir)
    return model_dir


def check_first_two_tokens(engine, model_dir: Path, prompt: list[int], n: int,
                           temperature: float = 2.0, top_p: float = 0.95) -> None:
    """The engine's first two sampled tokens over seeds 0..n-1 against the target's warped
    distribution (transformers, enumerated): a chi-square test per position (the second given
    that the first was not an EOS). The tiny models are peaked, so the default T = 2 spreads
    their mass over enough tokens for a test with few draws."""
    from transformers import LlamaForCausalLM

    from spec_compiler import sampling
    from test_sampling import chi_square_pvalue

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    one = torch.ones(1)

    def dist(ids):
        with torch.no_grad():
            lg = hf(torch.tensor([ids])).logits[:, -1]
        return sampling.warp(lg, one * temperature, torch.zeros(1, dtype=torch.long), one * top_p)[0].double()

    p1 = dist(prompt)
    eos = set(engine.spec.model.eos_token_ids)
    p2 = sum(p1[a] * dist(prompt + [a]) for a in range(len(p1)) if p1[a] > 0 and a not in eos)
    firsts, seconds = torch.zeros_like(p1), torch.zeros_like(p1)
    for s in range(n):
        out = engine.generate(prompt, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=s).output_ids
        firsts[out[0]] += 1
        if len(out) > 1:
            seconds[out[1]] += 1
    for counts, probs in ((firsts, p1), (seconds, p2 / p2.sum())):
        assert int((probs * counts.sum() >= 5).sum()) >= 5, "too few populated cells for a meaningful test"
        assert chi_square_pvalue(counts, probs) > 1e-4


def small_graphs(out: Path) -> list:
    """Two traced graphs of one function at batch 1 and 4, as `lower_all` takes them (label,
    graph, example inputs, package path under `out`): for the lowering tests."""
    from torch import fx

    def f(w, x, n):
        return (x @ w).relu() * n.float()[:, None], n + 1

    todo = []
    for b in (1, 4):
        args = [torch.randn(8, 8), torch.randn(b, 8), torch.arange(b)]
        todo.append((f"f.b{b}", fx.symbolic_trace(f), args, out / f"f.b{b}.pt2"))
    return todo
