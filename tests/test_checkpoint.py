from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import tiny_model

from layerskip.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from layerskip.config import TokenizerConfig
from layerskip.errors import CheckpointError

TOK_CFG = TokenizerConfig(vocab_size=400)


@pytest.fixture
def saved(tmp_path, tiny_tokenizer):
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size)
    path = save_checkpoint(
        tmp_path / "run" / "best", model, tiny_tokenizer, tokenizer_config=TOK_CFG,
        train_config={"lr": 1e-3}, trainer_state={"step": 7, "rng": torch.get_rng_state()},
    )
    return model, path


def test_round_trip_is_exact_and_carries_config_and_tokenizer(saved, tiny_tokenizer):
    model, path = saved
    ckpt = load_checkpoint(path)
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    assert torch.equal(ckpt.model(idx).logits, model(idx).logits)
    assert ckpt.model_config == model.config
    assert ckpt.tokenizer.model_proto == tiny_tokenizer.model_proto
    assert ckpt.train_config == {"lr": 1e-3}
    assert ckpt.model.lm_head.weight.data_ptr() == ckpt.model.embed_tokens.weight.data_ptr()
    assert load_trainer_state(path)["step"] == 7


def test_run_directory_means_its_best_checkpoint(saved):
    _, path = saved
    assert load_checkpoint(path.parent).path == path


def test_the_current_directory_names_a_checkpoint_or_run(saved, monkeypatch):
    """`--checkpoint .` from inside a run or checkpoint directory (a path without a name)."""
    _, path = saved
    monkeypatch.chdir(path.parent)
    assert load_checkpoint(".").path.resolve() == path
    monkeypatch.chdir(path)
    assert load_checkpoint(".").path.resolve() == path


def test_overwriting_leaves_no_temporary_files(saved, tiny_tokenizer):
    model, path = saved
    save_checkpoint(path, model, tiny_tokenizer, tokenizer_config=TOK_CFG)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best"]


def test_an_interrupted_swap_is_recovered(saved):
    _, path = saved
    path.rename(path.with_name(".best.old"))  # a crash between the two renames
    assert load_checkpoint(path).path == path


def test_missing_path_and_plain_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(pt)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        load_checkpoint(tmp_path)


def test_truncated_weights(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_config_that_does_not_match_the_weights(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["model"]["d_ff"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config does not match the weights.*shape mismatch"):
        load_checkpoint(path)


def test_unknown_schema_version_and_bad_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema version 99"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    config["model"]["num_heads"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_heads"):
        load_checkpoint(path)


def test_missing_and_corrupt_tokenizer(saved):
    _, path = saved
    (path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="tokenizer model is corrupt"):
        load_checkpoint(path)
    (path / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer model .* is missing"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/layerskip-pwned", "w"))


def test_pickle_payload_in_trainer_state_is_refused_without_running(saved, tmp_path):
    import os

    _, path = saved
    marker = "/tmp/layerskip-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    (path / "trainer_state.pt").write_bytes(pickle.dumps({"step": _Payload()}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_trainer_state(path)
    assert not os.path.exists(marker)


def test_a_config_of_absurd_size_is_refused_before_anything_is_allocated(saved, capsys):
    from layerskip.cli import main

    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["model"]["d_model"] = 1_000_000_000  # its embedding alone would take 1.6 TB; the whole model ~4 TB
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config does not match the weights.*shape mismatch.*1000000000"):
        load_checkpoint(path)
    assert main(["generate", "--checkpoint", str(path), "--prompt", "The game"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("layerskip generate: error:") and "does not match" in err


def test_rope_scaling_and_head_dim_round_trip_and_plain_configs_are_written_as_before(tmp_path, tiny_tokenizer):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size, head_dim=16, num_kv_heads=2, rope_scaling=llama3)
    save_checkpoint(tmp_path / "scaled", model, tiny_tokenizer, tokenizer_config=TOK_CFG)
    ckpt = load_checkpoint(tmp_path / "scaled")
    assert ckpt.model_config == model.config and ckpt.model_config.rope_scaling.factor == 8.0
    idx = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.equal(ckpt.model(idx).logits, model(idx).logits)
    save_checkpoint(tmp_path / "plain", tiny_model(vocab_size=tiny_tokenizer.vocab_size), tiny_tokenizer,
                    tokenizer_config=TOK_CFG)
    written = json.loads((tmp_path / "plain" / "config.json").read_text())["model"]
    assert "head_dim" not in written and "rope_scaling" not in written  # readable by layerskip before these fields
    assert json.loads((tmp_path / "scaled" / "config.json").read_text())["model"]["head_dim"] == 16
