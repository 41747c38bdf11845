"""The manifest names exactly what travels, what stays local and what is frozen, with real byte counts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_VIT, build_cli, round_callback, text_config, vision_config
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.manifest import build_manifest, format_manifest, identity_payload_bytes, read_manifest, write_manifest

CASES = [
    ("text", "head", {}),
    ("text", "bitfit", {}),
    ("text", "full", {}),
    ("text", "lora", {"r": 2, "alpha": 4}),
    ("text", "lora", {"r": 2, "head": "local"}),
    ("vision", "lora", {"r": 2}),
    ("vision", "bitfit", {}),
]


def _config(kind, method, args, tiny_bert_dir, tmp_path):
    peft = {"class_path": method, "init_args": args}
    fed = {"rounds": 1, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0}
    if kind == "text":
        return text_config(tiny_bert_dir, tmp_path, model={"peft": peft}, federation=fed)
    return vision_config(tmp_path, model={"peft": peft}, federation=fed)


@pytest.mark.parametrize(("kind", "method", "args"), CASES, ids=[f"{k}-{m}-{a.get('head', 'shared')}" for k, m, a in CASES])
def test_manifest_matches_what_travels_in_a_real_round(kind, method, args, tiny_bert_dir, tmp_path):
    cli = build_cli(_config(kind, method, args, tiny_bert_dir, tmp_path), tmp_path)
    dm = cli.datamodule
    dm.setup("fit")
    module = cli.model
    module.build(dm.num_classes)
    manifest = build_manifest(module, IdentityCodec())
    params = dict(module.model.named_parameters())
    names = {c: [t["name"] for t in manifest[c]["tensors"]] for c in ("shared", "local", "frozen")}
    assert sorted(names["shared"] + names["local"] + names["frozen"]) == sorted(params)  # a partition
    if method != "full":
        assert names["frozen"]
    before = {n: p.detach().clone() for n, p in params.items()}

    cli.trainer.fit(module, datamodule=dm)

    fed = round_callback(cli)
    # what travels: the global state is exactly the decoded broadcast, named as the manifest says
    assert list(fed.global_state) == names["shared"]
    decoded = fed.client.receive(fed.server.broadcast(fed.global_state))
    assert list(decoded) == names["shared"]
    assert manifest["shared_bytes_per_round"] == len(fed.server.broadcast(fed.global_state))
    # uplink bytes logged = clients x the manifest's per-round payload (identity codec: fixed length)
    assert fed.history[-1]["uplink_bytes"] == fed.history[-1]["num_clients"] * manifest["shared_bytes_per_round"]
    after = dict(module.model.named_parameters())
    for n in names["frozen"]:
        assert torch.equal(after[n], before[n]), f"frozen tensor {n} changed"
    trained = {n for n in names["shared"] if not torch.equal(after[n], before[n])}
    assert trained == set(names["shared"]), f"shared tensors unchanged by a round: {set(names['shared']) - trained}"
    for client_state in fed.client_store.values():  # local tensors changed on the clients, not globally
        for n, value in client_state.get("local", {}).items():
            assert n in names["local"]
    if names["local"]:
        assert any(
            not torch.equal(s["local"][n], before[n]) for s in fed.client_store.values() for n in names["local"]
        )
    for shape_entry in manifest["shared"]["tensors"]:
        assert tuple(shape_entry["shape"]) == tuple(params[shape_entry["name"]].shape)
        assert shape_entry["numel"] == params[shape_entry["name"]].numel()
        assert shape_entry["dtype"] == "float32"


def _built(cfg, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cli = build_cli(cfg, tmp_path)
    cli.datamodule.setup("fit")
    cli.model.build(cli.datamodule.num_classes)
    return cli.model


def test_full_model_bytes_is_the_real_identity_payload_length(tiny_bert_dir, tmp_path):
    full = _built(text_config(tiny_bert_dir, tmp_path / "f", model={"peft": {"class_path": "full"}}), tmp_path / "f")
    every = {n: p.detach().float() for n, p in full.model.named_parameters()}
    expected = len(IdentityCodec().encode(every))
    assert build_manifest(full)["full_model_bytes_per_round"] == expected
    # every method on the same base reports the same full size (LoRA's adapter tensors and peft's head copy excluded)
    module = _built(text_config(tiny_bert_dir, tmp_path / "l", model={"peft": {"class_path": "lora"}}), tmp_path / "l")
    manifest = build_manifest(module)
    assert manifest["full_model_bytes_per_round"] == expected
    assert identity_payload_bytes({"a": (2, 3), "b": ()}) == len(IdentityCodec().encode({"a": torch.ones(2, 3), "b": torch.tensor(1.0)}))
    assert manifest["reduction"] > 10
    assert manifest["shared"]["counts"]["numel"] + manifest["frozen"]["counts"]["numel"] == manifest["total_numel"]
    assert manifest["reduction"] == pytest.approx(expected / manifest["shared_bytes_per_round"])

    path = write_manifest(manifest, tmp_path / "run" / "manifest.json")
    assert read_manifest(path.parent) == json.loads(json.dumps(manifest))
    text = format_manifest(manifest)
    assert "lora" in text and "BertForSequenceClassification" in text and "shared" in text and "x more" in text
    assert len(text.splitlines()) <= 7


def test_manifest_of_a_full_fine_tuning_run_has_no_frozen_tensors(tmp_path):
    cfg = vision_config(tmp_path, model={"task": TINY_VIT, "peft": {"class_path": "full"}})
    cli = build_cli(cfg, tmp_path)
    cli.datamodule.setup("fit")
    cli.model.build(cli.datamodule.num_classes)
    manifest = build_manifest(cli.model)
    assert manifest["frozen"]["counts"]["tensors"] == 0
    assert manifest["reduction"] == pytest.approx(1.0)
