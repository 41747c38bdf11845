"""Image classification with timm."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from fedlight.data.base import Example
from fedlight.hookspecs import hookimpl
from fedlight.tasks.base import StepOutput, Task, classification_metrics, resolve_local_path


def load_state_file(path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch file loaded with ``weights_only=True`` (never pickle)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


class ImageClassification(Task):
    """Image classification with any timm model: random-initialised, pretrained from a pip package, or a local checkpoint.

    ``model`` is a timm architecture name (``timm.list_models()``), built with ``pretrained=False``
    so nothing is downloaded. ``weights: package:<name>`` loads pretrained weights shipped in a pip
    package (converted and verified once into the user cache, see :mod:`fedlight.models.vision`);
    ``checkpoint_path`` loads local weights (safetensors or a torch state dict); ``pretrained: true``
    loads timm's own pretrained weights for ``model`` (a pretrained tag such as ``resnet18.a1_in1k``
    picks one) from the Hugging Face cache, downloading them only when ``HF_HUB_OFFLINE`` is off
    (:func:`fedlight.tasks.sources.timm_pretrained_file`). Either way a
    classifier whose shape differs is re-initialised and a ViT position grid is resampled to
    ``image_size``. Images are resized to ``image_size`` and grey images repeated to ``in_chans``
    channels; ``normalize`` (default: on with ``weights``) applies the backbone's timm data-config
    mean/std, with its interpolation for resizing.
    """

    name = "image_classification"
    family = "timm"
    ignore_label_keys = ("labels",)  # F.cross_entropy ignores -100
    example_args: ClassVar[dict[str, Any]] = {
        "model": "vit_tiny_patch16_224",
        "image_size": 16,
        "model_kwargs": {"patch_size": 8, "depth": 2},
    }

    def __init__(
        self,
        model: str = "resnet18",
        checkpoint_path: str | None = None,
        image_size: int | None = None,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        normalize: bool | None = None,
        pretrained: bool = False,
    ) -> None:
        import timm

        if not timm.is_model(model):
            close = timm.list_models(f"*{model.split('_')[0]}*")[:10]
            raise ValueError(f"unknown timm model {model!r}; similar names: {close}")
        if sum(map(bool, (weights, checkpoint_path, pretrained))) > 1:
            raise ValueError("model.task: give one of weights (package:...), checkpoint_path or pretrained: true")
        self.model_name = model
        field = "model.task.init_args.checkpoint_path"
        self.checkpoint_path = resolve_local_path(checkpoint_path, field) if checkpoint_path else None
        self.pretrained = pretrained
        if pretrained:  # a file in the hub cache (fetched now when online): loaded like a local checkpoint
            from fedlight.tasks.sources import timm_pretrained_file

            self.checkpoint_path = timm_pretrained_file(model)
        self.image_size = image_size
        self.in_chans = in_chans
        self.model_kwargs = dict(model_kwargs or {})
        self.weights = weights
        if weights:
            from fedlight.models.vision import get_source

            source = get_source(weights, model)  # unknown source / wrong architecture: fail now
            source.package_dir()  # package missing: fail now, with the install command
            if in_chans != 3:
                raise ValueError(f"weights {weights!r} are RGB: in_chans must be 3 (grey images are repeated)")
        cfg = timm.get_pretrained_cfg(model)
        if image_size is not None and "img_size" not in self.model_kwargs and cfg is not None and cfg.fixed_input_size:
            # fixed-size models (ViTs) are built for the configured size; pretrained grids are resampled
            self.model_kwargs["img_size"] = image_size
            patch = self.model_kwargs.get("patch_size") or _patch_size(model)
            if patch and image_size % patch:
                raise ValueError(
                    f"model.task.image_size ({image_size}) must be a multiple of {model}'s patch size {patch}"
                )
        self.normalize = bool(weights or pretrained) if normalize is None else normalize
        data_cfg = cfg.to_dict() if cfg is not None else {}
        self.mean = tuple(data_cfg.get("mean") or (0.485, 0.456, 0.406))
        self.std = tuple(data_cfg.get("std") or (0.229, 0.224, 0.225))
        self.interpolation = data_cfg.get("interpolation", "bilinear") if self.normalize else "bilinear"

    def build_model(self, num_classes: int) -> nn.Module:
        import timm

        model = timm.create_model(
            self.model_name, pretrained=False, num_classes=num_classes, in_chans=self.in_chans, **self.model_kwargs
        )
        loaded = None
        if self.weights:
            from fedlight.models.vision import pretrained_state

            loaded = pretrained_state(self.weights, self.model_name)
        elif self.checkpoint_path is not None:
            loaded = load_state_file(self.checkpoint_path)
        if loaded is not None:
            from fedlight.models.vision import adapt_state

            own = model.state_dict()
            loaded = adapt_state(model, loaded)
            usable = {k: v for k, v in loaded.items() if k in own and own[k].shape == v.shape}
            missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
            head = self.head_modules(model)
            not_head = [k for k in missing if not any(k.startswith(h + ".") for h in head)]
            if not_head:
                raise ValueError(
                    f"checkpoint {self.weights or self.checkpoint_path} does not fit {self.model_name}: "
                    f"{len(not_head)} backbone tensors missing or mis-shaped, e.g. {not_head[:5]}"
                )
            model.load_state_dict(usable, strict=False)
        return model

    def head_modules(self, model: nn.Module) -> list[str]:
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")  # timm models carry their cfg
        heads = [classifier] if isinstance(classifier, str) else list(classifier)
        names = {n for n, _ in model.named_modules()}
        return [h for h in heads if h in names]

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        images = torch.stack([torch.as_tensor(e["image"], dtype=torch.float32) for e in examples])
        if images.shape[1] == 1 and self.in_chans != 1:
            images = images.expand(-1, self.in_chans, -1, -1)
        if self.image_size is not None and images.shape[-1] != self.image_size:
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode=mode, align_corners=False)
            if mode == "bicubic":
                images = images.clamp(0.0, 1.0)  # bicubic overshoots; inputs are [0, 1] images
        if self.normalize:
            channels = images.shape[1]
            mean = torch.tensor(self.mean[:channels]).view(1, -1, 1, 1)
            std = torch.tensor(self.std[:channels]).view(1, -1, 1, 1)
            images = (images - mean) / std
        return {"images": images.contiguous(), "labels": torch.tensor([int(e["label"]) for e in examples])}

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        logits = model(batch["images"])
        return StepOutput(F.cross_entropy(logits, batch["labels"]), logits.argmax(-1), batch["labels"])

    def metrics(self, num_classes: int) -> MetricCollection:
        return classification_metrics(num_classes)


def _patch_size(model: str) -> int | None:
    """Patch size from a timm ViT name (``..._patch14_...``), or None."""
    import re

    match = re.search(r"patch(\d+)", model)
    return int(match.group(1)) if match else None


@hookimpl
def fedlight_tasks() -> list[type]:
    return [ImageClassification]
