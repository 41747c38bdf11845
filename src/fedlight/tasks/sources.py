"""Where a task's pretrained model comes from: a local directory, ``package:NAME``, or a Hugging Face hub id.

One resolver for every task, so a local path, a model a pip package ships and a hub model behave the same:
each becomes a local directory (or file) before the task builds anything. Hub models use the standard
Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and respect
``HF_HUB_OFFLINE``: offline (the ``fedlight`` CLI's default on this machine; set ``HF_HUB_OFFLINE=0`` to opt in
to downloads), a model already in the cache loads and one that is not fails at once, before any data is
read or any round runs, with the command that fetches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedlight.tasks.base import resolve_local_path

#: ``name`` or ``org/name`` (the hub's repo-id syntax), optionally ``@revision``
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?(@[\w./-]+)?$")
#: files a transformers model may need besides its weights (config, tokenizer, generation config, chat template)
TRANSFORMERS_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja")


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the hub may not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) read now.

    huggingface_hub reads the variable once, at import: if it was imported offline, it stays offline
    whatever the environment says later, so either one saying "offline" wins.
    """
    import huggingface_hub.constants as hub_constants

    explicit = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return _is_true(explicit) or bool(hub_constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The standard hub cache, read from the environment now (tests and users may point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    import huggingface_hub.constants as hub_constants

    return Path(hub_constants.HF_HUB_CACHE)


def looks_like_hub_id(spec: str) -> bool:
    """``bert-base-uncased`` or ``org/name[@rev]``; anything path-like (``./x``, ``/x``, ``~``, ``a/b/c``) is not."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~")) and ".." not in spec


def split_revision(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def fetch_hint(repo_id: str, field: str) -> str:
    return (
        f"fetch it once while online with `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`), or run with HF_HUB_OFFLINE=0 to let fedlight download it, "
        f"or set {field} to a local directory (e.g. one written by save_pretrained)"
    )


def weight_patterns(files: list[str]) -> list[str]:
    """Which weight files of a hub repo to download: safetensors when the repo has them, else PyTorch ``.bin``.

    Many repos carry the same weights in several formats (TF, Flax, ONNX, safetensors and .bin):
    fetching only one keeps a BERT-base download at 440 MB instead of over 2 GB.
    """
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors", "*.safetensors.index.json"]
    if any(f.endswith(".bin") for f in files):
        return ["*.bin", "*.bin.index.json"]
    if any(f.endswith(".gguf") for f in files):
        return ["*.gguf"]
    raise FileNotFoundError(
        f"the hub repo has no PyTorch weights (safetensors, .bin or .gguf) among {sorted(files)[:10]}"
    )


def hub_snapshot(spec: str, field: str = "model_name_or_path", allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot directory of a hub model: looked up in the cache offline, downloaded into it online.

    ``allow_patterns`` limits a download (``None``: the side files plus one weight format, see
    :func:`weight_patterns`); offline, whatever snapshot the cache holds for the revision is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision = split_revision(spec)
    cache = hub_cache_dir()
    if hub_offline():
        try:
            path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
            raise FileNotFoundError(
                f"{field} {spec!r} is not a local path, and hub model {repo_id!r} is not in the Hugging Face "
                f"cache {cache} while HF_HUB_OFFLINE is set; {fetch_hint(repo_id, field)}"
            ) from err
        if not any(path.iterdir()):
            raise FileNotFoundError(f"the cached snapshot {path} of {repo_id!r} is empty; {fetch_hint(repo_id, field)}")
        return path
    if allow_patterns is None:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id, revision=revision)
        allow_patterns = [*TRANSFORMERS_SIDE_FILES, *weight_patterns(files)]
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=allow_patterns))


def resolve_model_source(spec: str, field: str = "model_name_or_path") -> Path:
    """A local directory or file for ``spec``: an existing path, ``package:NAME``, or a hub id (see :func:`hub_snapshot`).

    An existing local path always wins over a hub id of the same spelling, so ``models/bert`` on disk is
    never shadowed by a hub repo.
    """
    if spec.startswith("package:") or Path(spec).expanduser().exists() or not looks_like_hub_id(spec):
        return resolve_local_path(spec, field)
    return hub_snapshot(spec, field)


def timm_pretrained_file(model: str, field: str = "model.task.init_args.model") -> Path:
    """The local weight file of timm's pretrained ``model`` (``name`` or ``name.tag``) from the hub cache.

    Offline, a file missing from the cache fails here with the download command; online it is downloaded
    into the standard cache. The task hands the file to timm (``pretrained_cfg_overlay``), so timm itself
    never needs the network.
    """
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except RuntimeError:  # an unknown pretrained tag
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        tags = timm.list_pretrained(f"{model.split('.')[0]}*")[:10]
        raise ValueError(f"timm has no hub weights for {model!r}; pretrained tags of this architecture: {tags}")
    repo_id, revision = split_revision(hub_id)
    filename = getattr(cfg, "hf_hub_filename", None)
    candidates = [filename] if filename else ["model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]
    cache = hub_cache_dir()
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        for name in candidates:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=revision)
            if isinstance(found, str):
                return Path(found)
        raise FileNotFoundError(
            f"{field} {model!r}: timm's pretrained weights {repo_id!r} are not in the Hugging Face cache {cache} "
            f"while HF_HUB_OFFLINE is set; {fetch_hint(repo_id, 'model.task.init_args.checkpoint_path')}"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache))
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"hub repo {repo_id!r} has none of {candidates}")
