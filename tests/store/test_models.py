"""A base model is known by its content: a folder by its files' hashes, a hub id by the commit it resolves to."""
import shutil

import pytest

from job.errors import ConfigError
from job.store.models import model_identity


def test_a_folder_is_known_by_its_model_files(tmp_path, tiny_model):
    base = shutil.copytree(tiny_model, tmp_path / "base")
    before = model_identity(str(base))
    (base / "README.md").write_text("a model card says nothing about the weights")
    assert model_identity(str(base)) == before
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # replaced in place
    assert model_identity(str(base)) != before
    (base / "model.safetensors").write_bytes(weights)
    (base / "config.json").write_text((base / "config.json").read_text().replace('"dim": 32', '"dim": 32 '))
    assert model_identity(str(base)) != before  # the config counts too
    with pytest.raises(ConfigError, match="no such model directory"):
        model_identity(str(tmp_path / "missing"))


def test_a_hub_id_is_known_by_the_commit_it_resolves_to(tmp_path, monkeypatch):
    """Offline, as loading does: the commit the local cache's refs/main names (online: the hub's current one)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (repo / "refs" / "main").write_text("a" * 40)
    assert model_identity("org/tiny") == f"org/tiny@{'a' * 40}"
    (repo / "refs" / "main").write_text("b" * 40)  # the weights were updated on the hub
    assert model_identity("org/tiny") == f"org/tiny@{'b' * 40}"
    with pytest.raises(Exception) as info:  # neither cached nor reachable: the hub's own error, sorted
        model_identity("org/not-cached")
    assert getattr(info.value, "exit_code", None) in (2, 75)


def test_a_runtime_downloads_only_its_own_weights():
    from job.store.models import _other_runtimes_file

    files = ["config.json", "tokenizer.json", "vocab.txt", "serving.json", "model.safetensors", "training_args.bin",
             "model.onnx", "model_int8.onnx"]
    kept = {runtime: [f for f in files if not _other_runtimes_file(f, runtime)] for runtime in ("torch", "onnx", "onnx-int8")}
    common = ["config.json", "tokenizer.json", "vocab.txt", "serving.json"]
    assert kept["torch"] == [*common, "model.safetensors", "training_args.bin"]
    assert kept["onnx"] == [*common, "training_args.bin", "model.onnx"]
    assert kept["onnx-int8"] == [*common, "training_args.bin", "model_int8.onnx"]
