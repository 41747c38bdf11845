"""Hub ids resolve through the standard Hugging Face cache; offline, a cached model loads and a missing one fails first.

Every test runs with HF_HUB_OFFLINE=1 and socket connects disabled: a cache laid out as the hub writes it
(``models--org--name/snapshots/<rev>/…`` plus ``refs/main``) is built from tiny local models.
"""

from __future__ import annotations

import random
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import read_rounds, run_fit, text_config

from fedlight.tasks.sources import hub_offline, looks_like_hub_id, resolve_model_source, weight_patterns

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under a temp HF_HOME, offline, with every socket connect raising."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return home / "hub"


def put_in_cache(cache: Path, repo_id: str, files_from: Path) -> Path:
    """Lay a local model directory out as the hub cache does; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


def test_cached_hub_model_loads_offline_and_trains(offline_cache, tiny_bert_dir, tmp_path):
    from fedlight.tasks.text_classification import TextClassification

    snapshot = put_in_cache(offline_cache, "fedlight-test/tiny-bert", tiny_bert_dir)
    task = TextClassification("fedlight-test/tiny-bert", max_length=16)
    assert task.path == snapshot
    model = task.build_model(3)
    assert torch.equal(
        dict(model.named_parameters())["bert.embeddings.word_embeddings.weight"],
        _saved(tiny_bert_dir)["embeddings.word_embeddings.weight"],
    )
    # the whole CLI path, offline: two real rounds on the cached model
    cfg = text_config(tiny_bert_dir, tmp_path, model={"task": {"init_args": {"model_name_or_path": "fedlight-test/tiny-bert"}}})
    run_fit(cfg, tmp_path)
    assert [r["round"] for r in read_rounds(tmp_path)][-1] == "2"


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("spec", ["bert-base-uncased", "fedlight-test/not-cached", "org/name@main"])
def test_missing_hub_model_fails_before_training_with_the_fetch_command(offline_cache, spec):
    from fedlight.tasks.causal_lm import CausalLM
    from fedlight.tasks.text_classification import TextClassification

    repo_id = spec.split("@")[0]
    for task in (TextClassification, CausalLM):
        with pytest.raises(FileNotFoundError) as err:
            task(spec)
        message = str(err.value)
        assert f"huggingface-cli download {repo_id}" in message and f"hf download {repo_id}" in message
        assert "local directory" in message and "HF_HUB_OFFLINE=0" in message


def test_existing_local_path_wins_and_path_like_specs_never_go_to_the_hub(offline_cache, tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert_dir, tmp_path / "org" / "name")
    assert resolve_model_source("org/name") == Path("org/name")  # on disk: never shadowed by a hub repo
    for spec in ("./nope", "~/nope", "a/b/c", "/abs/nope", "../x"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_source(spec)


def test_hub_id_syntax_on_generated_strings():
    rng = random.Random(0)
    alphabet = "abcXYZ019-_."
    for _ in range(300):
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        spec = "/".join(parts)
        expected = len(parts) <= 2 and all(p[0].isalnum() for p in parts) and ".." not in spec
        assert looks_like_hub_id(spec) == expected, spec
    assert looks_like_hub_id("bert-base-uncased") and looks_like_hub_id("HuggingFaceTB/SmolLM2-135M@v1.0")
    assert not looks_like_hub_id("package:x") and not looks_like_hub_id("a b")


def test_weight_patterns_pick_one_format():
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"]
    assert weight_patterns(both) == ["*.safetensors", "*.safetensors.index.json"]
    assert weight_patterns(["config.json", "pytorch_model.bin"]) == ["*.bin", "*.bin.index.json"]
    with pytest.raises(FileNotFoundError, match="no PyTorch weights"):
        weight_patterns(["config.json", "tf_model.h5"])


def test_offline_switch_follows_an_explicit_env(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for value, offline in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # the CLI's default; an explicit HF_HUB_OFFLINE=0 wins
        assert hub_offline() is (offline or value == ""), value
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # hub imported offline: stays offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub_offline()


def test_timm_pretrained_tag_loads_from_the_cache_offline(offline_cache, tmp_path):
    import timm
    from safetensors.torch import save_file

    from fedlight.tasks.image_classification import ImageClassification

    torch.manual_seed(1)
    source = timm.create_model("test_vit.r160_in1k", pretrained=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download timm/test_vit.r160_in1k"):
        ImageClassification("test_vit.r160_in1k", pretrained=True)
    put_in_cache(offline_cache, "timm/test_vit.r160_in1k", weights)
    task = ImageClassification("test_vit.r160_in1k", pretrained=True)
    assert task.normalize
    model = task.build_model(5)
    own, ref = model.state_dict(), source.state_dict()
    backbone = [k for k in ref if not k.startswith("head.")]
    assert backbone and all(torch.equal(own[k], ref[k]) for k in backbone)
    assert own["head.weight"].shape[0] == 5  # a new head for the dataset's classes
    with pytest.raises(ValueError, match="timm has no hub weights"):
        ImageClassification("vit_tiny_patch16_224.nonexistent_tag", pretrained=True)
