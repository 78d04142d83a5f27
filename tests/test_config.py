"""CompileConfig's up-front checks of sizes the CUDA tree-attention kernels cannot take, and that
config.py reads the kernels' limits without importing triton (CPU installs may lack it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spec_compiler.config import CompileConfig, DraftConfig, ModelConfig
from spec_compiler.errors import SpecCompileError
from spec_compiler.kernels.limits import MAX_PREFILL_CHUNK, MAX_TREE_NODES
from spec_compiler.trees import TreeSpec, chain

MODEL = ModelConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, n_layers=1, n_heads=4,
                    n_kv_heads=2, head_dim=8)
DRAFT = DraftConfig(n_layers=1, fc_bias=True, has_embed=False, layer=MODEL)


def wide(n_nodes: int) -> TreeSpec:
    """The root and n_nodes - 1 children: the most nodes for the least --max-seq-len."""
    return TreeSpec(f"wide-{n_nodes}", tuple((r,) for r in range(n_nodes - 1)))


def config(tree: TreeSpec, prefill_chunk: int = 64, device: str = "cpu") -> CompileConfig:
    return CompileConfig(model=MODEL, draft=DRAFT, tree=tree, device=device,
                         max_seq_len=prefill_chunk + tree.n_nodes + tree.max_depth + 2,
                         prefill_chunk=prefill_chunk)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_largest_tree_and_prefill_chunk_are_accepted(device):
    for tree in (wide(MAX_TREE_NODES), chain(MAX_TREE_NODES - 1)):
        assert config(tree, MAX_PREFILL_CHUNK, device).tree.n_nodes == MAX_TREE_NODES


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # the same limits on every device
@pytest.mark.parametrize("tree", [wide(MAX_TREE_NODES + 1), chain(MAX_TREE_NODES)],
                         ids=["wide", "chain"])
def test_tree_past_the_kernel_limit_is_one_clear_error(tree, device):
    with pytest.raises(SpecCompileError) as e:
        config(tree, device=device)
    msg = str(e.value)
    assert "\n" not in msg
    for word in ("--tree", repr(tree.name), f"{MAX_TREE_NODES + 1} nodes", f"at most {MAX_TREE_NODES}"):
        assert word in msg, (word, msg)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("chunk", [MAX_PREFILL_CHUNK + 1, 0])
def test_prefill_chunk_past_the_kernel_limit_is_one_clear_error(chunk, device):
    with pytest.raises(SpecCompileError) as e:
        config(chain(3), prefill_chunk=chunk, device=device)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"--prefill-chunk {chunk}" in msg and str(MAX_PREFILL_CHUNK) in msg, msg


def test_config_does_not_import_triton():
    code = ("import sys; import spec_compiler.config, spec_compiler.train.fit_tree; "
            "sys.exit('triton' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr or "spec_compiler.config imported triton"
