"""Contract tests generated from the registry: every PEFT method x every model family it declares.

Models: a tiny timm ViT (``timm``), a tiny BERT classifier and a tiny GPT-2 causal LM (``transformers``).
A method that peft (or fedlight) cannot apply to a given model must say so while the model is built
(a ValueError naming the method), which is checked, then the case is skipped with that message.
"""

from __future__ import annotations

import struct
import warnings

import pytest
import torch

from conftest import TINY_VIT, round_callback, run_fit, text_config, vision_config
from fedlight.codecs.identity import IdentityCodec
from fedlight.codecs.wire import framed_size
from fedlight.plugins import build_registry

REGISTRY = build_registry(autoload=False)
METHODS = REGISTRY.entries["peft_methods"]
MODELS = {"vit": "timm", "bert": "transformers", "gpt2": "transformers"}
CASES = [(name, model) for name, e in sorted(METHODS.items()) for model, fam in MODELS.items() if fam in e.cls.families]


@pytest.fixture(scope="module")
def tasks(tiny_bert_dir, tiny_gpt2_dir):
    from fedlight.tasks.causal_lm import CausalLM
    from fedlight.tasks.image_classification import ImageClassification
    from fedlight.tasks.text_classification import TextClassification

    return {
        "vit": ImageClassification(**TINY_VIT["init_args"]),
        "bert": TextClassification(str(tiny_bert_dir), max_length=16),
        "gpt2": CausalLM(str(tiny_gpt2_dir), max_length=16),
    }


def _inputs(kind: str, task) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"x": torch.randn(3, 3, 16, 16, generator=g)}
    if kind == "bert":
        batch = task.collate([{"text": t, "label": 0} for t in ("hello there", "hola amigo mio", "ciao")])
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    ids = torch.randint(2, 300, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model, kind: str, inputs: dict) -> torch.Tensor:
    if kind == "vit":
        return model(inputs["x"])
    return model(**inputs).logits


def _build(name: str, kind: str, tasks, **overrides):
    """(method, model) built under a fixed seed, or pytest.skip when the method refuses this model early."""
    cls = METHODS[name].cls
    task = tasks[kind]
    torch.manual_seed(0)
    model = task.build_model(3)
    method = cls(**{**cls.example_args, **overrides})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = method.apply(model, task.family, task.head_modules(model))
    except ValueError as err:
        assert name in str(err), f"refusal must name the method: {err}"
        pytest.skip(f"refused before training: {err}")
    return method, model


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_peft_contract(name, kind, tasks):
    method, model = _build(name, kind, tasks)
    inputs = _inputs(kind, tasks[kind])
    trainable = set(method.trainable_names(model))
    shared, local = method.shared_names(model), method.local_names(model)
    # only declared tensors require grad, and every one of them is shipped or kept local
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == (set(shared) | set(local)) - set(method.shared_buffers(model))
    assert not set(shared) & set(local)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        _out(model, kind, inputs).float().pow(2).mean().backward()
        if step == 0:  # every declared tensor is used by the forward pass
            unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, f"trainable but unused: {unused[:5]}"
        opt.step()
    if not method.merges_into_base:
        changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
        assert not changed, f"frozen tensors changed: {changed[:5]}"

    # trainable state -> a fresh, identically built model reproduces the outputs exactly
    state = method.get_state(model, shared + local)
    _, fresh = _build(name, kind, tasks)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(_out(fresh, kind, inputs), _out(model, kind, inputs)), "training changed nothing"
        method.set_state(fresh, state)
        assert torch.equal(_out(fresh, kind, inputs), _out(model, kind, inputs))

    # shipped bytes are exactly the identity payload minus its framing (magic, header, CRC)
    shipped = method.get_state(model, shared)
    payload = IdentityCodec().encode(shipped)
    (header_len,) = struct.unpack_from("<I", payload, 4)
    assert len(payload) == framed_size(header_len, sum(v.numel() * 4 for v in shipped.values()))


@pytest.mark.parametrize("name", sorted(METHODS), ids=sorted(METHODS))
@pytest.mark.parametrize("head", ["local", "frozen"])
def test_head_switch(name, head, tasks):
    cls = METHODS[name].cls
    kind = "vit" if "timm" in cls.families else "bert"
    head_names = lambda model: [n for n in method.trainable_names(model) if ".classifier." in f".{n}" or ".head." in f".{n}"]  # noqa: E731
    try:
        cls(**{**cls.example_args, "head": head})
    except ValueError as err:  # e.g. head-only tuning with a frozen head trains nothing
        pytest.skip(f"refused at construction: {err}")
    method, model = _build(name, kind, tasks, head=head)
    heads = head_names(model)
    if head == "frozen":
        assert not heads
    else:
        # the switch moves exactly the head into `local` (a method may keep other tensors local, e.g. FedSA-LoRA's B)
        shared_head, shared_model = _build(name, kind, tasks, head="shared")
        assert heads and set(method.local_names(model)) == set(heads) | set(shared_head.local_names(shared_model))
        assert not set(heads) & set(method.shared_names(model))


@pytest.mark.parametrize("name", sorted(n for n, e in METHODS.items() if e.cls.families != frozenset({"timm", "transformers"})))
def test_wrong_family_fails_early_naming_working_methods(name):
    cls = METHODS[name].cls
    (other,) = {"timm", "transformers"} - cls.families
    with pytest.raises(ValueError, match=name) as info:
        cls(**cls.example_args).check_family(other)
    assert "lora" in str(info.value)  # it names methods that do work for that family


def test_identity_at_init_and_vit_only_errors(tasks):
    """Adapters start as the base model; ViT-only methods refuse a model without `.blocks`."""
    import timm

    task = tasks["vit"]
    inputs = _inputs("vit", task)
    torch.manual_seed(0)
    base = task.build_model(3).eval()
    for name in ("adapter", "adaptformer"):
        _, model = _build(name, "vit", tasks)
        with torch.no_grad():
            assert torch.equal(_out(model.eval(), "vit", inputs), _out(base, "vit", inputs))
    for name in ("vpt", "adapter", "adaptformer"):
        resnet = timm.create_model("resnet10t", pretrained=False, num_classes=3)
        with pytest.raises(ValueError, match="ViT-like"):
            METHODS[name].cls().apply(resnet, "timm", ["fc"])


def test_unsupported_layer_fails_before_training(tasks):
    from fedlight.peft.peft_library import VeRA

    torch.manual_seed(0)
    model = tasks["vit"].build_model(3)
    with pytest.raises(ValueError, match="'vera' cannot adapt .*patch_embed.proj \\(Conv2d\\)"):
        VeRA(r=2, target=["patch_embed.proj"]).apply(model, "timm", ["head"])


FITS = [("vision", "lora", {"r": 2}), ("vision", "vpt", {"num_tokens": 2, "deep": True}),
        ("vision", "adapter", {"reduction": 8}), ("nlp", "prompt_tuning", {"num_virtual_tokens": 4}),
        ("nlp", "ia3", {})]  # fmt: skip


@pytest.mark.parametrize(("domain", "name", "args"), FITS, ids=[f"{d}-{n}" for d, n, _ in FITS])
def test_two_round_federated_fit(domain, name, args, tmp_path, tiny_bert_dir):
    peft_cfg = {"model": {"peft": {"class_path": name, "init_args": args}}}
    cfg = vision_config(tmp_path, **peft_cfg) if domain == "vision" else text_config(tiny_bert_dir, tmp_path, **peft_cfg)
    cli = run_fit(cfg, tmp_path)
    history = round_callback(cli).history
    assert [r["round"] for r in history][-2:] == [1, 2]
    module = cli.model
    assert type(module.peft).name == name
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_manifest_matches_what_travels_and_what_changes(name, kind, tasks):
    """Issue #11: for every PEFT method, the exchange manifest is exactly what travels and trains."""
    from fedlight.core.manifest import build_manifest
    from fedlight.core.module import FederatedModule

    method, model = _build(name, kind, tasks)  # skips methods that refuse this model
    module = FederatedModule(tasks[kind], METHODS[name].cls(**METHODS[name].cls.example_args))
    torch.manual_seed(0)
    module.build(3)
    manifest = build_manifest(module, IdentityCodec())
    listed = {cat: [t["name"] for t in manifest[cat]["tensors"]] for cat in ("shared", "local", "frozen")}
    assert listed["shared"] == module.shared_names
    assert listed["local"] == module.local_names
    params = dict(module.model.named_parameters())
    assert set(listed["frozen"]) == {n for n, p in params.items() if not p.requires_grad}
    shared_state = module.peft.get_state(module.model, module.shared_names)
    assert manifest["shared_bytes_per_round"] == len(IdentityCodec().encode(shared_state))
    # after local steps exactly the shared + local tensors may have changed, frozen ones are bit-identical
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-2)
    inputs = _inputs(kind, tasks[kind])
    for _ in range(2):
        optimizer.zero_grad()
        _out(module.model, kind, inputs).float().pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed <= set(listed["shared"]) | set(listed["local"])
    assert not changed & set(listed["frozen"])
