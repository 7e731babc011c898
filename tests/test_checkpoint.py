"""Weights files: byte-identical for identical weights (the eval cache keys on the file hash), round trip."""
import pytest
import torch

from harness.checkpoint import load_weights, save_weights
from harness.provenance import checkpoint_hash


def test_same_weights_and_metadata_give_the_same_bytes(tmp_path):
    state = {"b.weight": torch.randn(3, 4), "a.bias": torch.arange(5, dtype=torch.float32), "c": torch.ones(2, dtype=torch.bfloat16)}
    # many keys: safetensors' own writer orders them by hash map, differently from one call to the next
    meta = {f"key{i}": str(i) for i in range(12)}
    files = [save_weights(tmp_path / f"w{i}.safetensors", state, meta) for i in range(6)]
    assert len({f.read_bytes() for f in files}) == 1
    assert len({checkpoint_hash(f) for f in files}) == 1
    loaded, got_meta = load_weights(files[0])
    assert got_meta == meta
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype


def test_different_weights_give_different_bytes(tmp_path):
    a = save_weights(tmp_path / "a.safetensors", {"w": torch.zeros(3)}, {"m": "1"})
    b = save_weights(tmp_path / "b.safetensors", {"w": torch.tensor([0.0, 0.0, 1e-7])}, {"m": "1"})
    assert checkpoint_hash(a) != checkpoint_hash(b)


def test_truncated_file_is_a_clear_error(tmp_path):
    f = save_weights(tmp_path / "w.safetensors", {"w": torch.randn(64)}, {"m": "1"})
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")
