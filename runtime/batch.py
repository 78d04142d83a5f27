"""Engine.generate_batch's arguments: per-prompt requests from values given once or per prompt.

Each keyword of generate_batch (max_new_tokens, temperature, top_p, top_k, seed) is either one
value for every prompt or a list (or tuple) of one value per prompt. A single seed gives prompt
i the seed `seed + i`, so prompts with equal settings still draw different tokens, and a
prompt's tokens do not depend on which slot or batch-mates it gets. The values themselves are
checked by Engine._check, request by request, before anything runs.
"""

from __future__ import annotations

from spec_compiler.errors import SpecCompileError

KNOBS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


def expand_requests(prompts, max_new_tokens=None, temperature=0.0, top_p=1.0, top_k=0,
                    seed=None) -> list[tuple]:
    """-> one (prompt_ids, max_new_tokens, temperature, top_p, top_k, seed) per prompt, in order.
    Raises SpecCompileError for prompts that are not a list of prompts, or a per-prompt list
    of the wrong length."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise SpecCompileError(f"prompts: got {type(prompts).__name__}; pass a list of prompts, each "
                               "a list of token ids")
    if not all(hasattr(p, "__iter__") for p in prompts):
        raise SpecCompileError("prompts: got a list of token ids; pass a list of prompts (for one "
                               "prompt, [ids] or generate(ids))")
    n = len(prompts)
    values = dict(zip(KNOBS, (max_new_tokens, temperature, top_p, top_k, seed)))
    per_prompt = {}
    for name, v in values.items():
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise SpecCompileError(f"{name}: a list of {len(v)} values for {n} prompts; give one "
                                       "value for all, or one per prompt")
            per_prompt[name] = list(v)
        elif name == "seed" and v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecCompileError(f"seed {v!r}: must be an integer (or a list of one per prompt)")
            per_prompt[name] = [v + i for i in range(n)]
        else:
            per_prompt[name] = [v] * n
    return [(p, *(per_prompt[k][i] for k in KNOBS)) for i, p in enumerate(prompts)]
