"""Real multilingual dialogue text from the pip package ``chatterbot-corpus`` (BSD-3-Clause)."""

from __future__ import annotations

import importlib.resources
from typing import Literal

import numpy as np
import yaml

from fedlight.data.base import Dataset, DatasetSplits, Example, split_train_val
from fedlight.hookspecs import hookimpl

DEFAULT_LANGUAGES = ["english", "italian", "spanish", "portuguese", "dutch", "german", "indonesian", "turkish"]


def _corpus_root():
    try:
        return importlib.resources.files("chatterbot_corpus") / "data"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the chatterbot dataset needs the 'chatterbot-corpus' package: pip install chatterbot-corpus"
        ) from None


def _utterances(lang_dir) -> dict[str, list[str]]:
    """Map each topic file of one language to its distinct utterances (in file order)."""
    out: dict[str, list[str]] = {}
    for f in sorted(lang_dir.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        seen: dict[str, None] = {}
        for conv in doc.get("conversations") or []:
            for s in conv if isinstance(conv, list) else []:
                if isinstance(s, str) and s.strip():
                    seen.setdefault(s.strip(), None)
        out[f.name[:-4]] = list(seen)
    return out


class ChatterbotCorpus(Dataset):
    """Human-written chatbot dialogue in 28 languages, labelled by language or by topic.

    ``label: language`` classifies utterances by language (the quickstart's task: Spanish vs
    Portuguese vs Italian is not trivial for an English encoder); ``label: topic`` classifies English
    utterances by the corpus' topic files. ``max_per_class`` caps the dominant classes so chance is
    close to ``1 / num_classes``.
    """

    name = "chatterbot"
    example_args = {"languages": ["english", "spanish"], "max_per_class": 20}

    def __init__(
        self,
        label: Literal["language", "topic"] = "language",
        languages: list[str] | None = None,
        topics: list[str] | None = None,
        max_per_class: int | None = 300,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if max_per_class is not None and max_per_class < 2:
            raise ValueError(f"max_per_class must be >= 2 or null, got {max_per_class}")
        self.label = label
        self.languages = languages or (DEFAULT_LANGUAGES if label == "language" else ["english"])
        self.topics = topics
        self.max_per_class = max_per_class
        self.val_fraction = val_fraction
        self.seed = seed

    def _classes(self) -> dict[str, list[str]]:
        root = _corpus_root()
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        unknown = [lang for lang in self.languages if lang not in available]
        if unknown:
            raise ValueError(f"chatterbot: unknown languages {unknown}; available: {available}")
        classes: dict[str, list[str]] = {}
        for lang in self.languages:
            for topic, texts in _utterances(root / lang).items():
                if self.label == "language":
                    classes.setdefault(lang, []).extend(texts)
                elif self.topics is None or topic in self.topics:
                    classes.setdefault(topic, []).extend(texts)
        if self.label == "topic" and self.topics:
            missing = sorted(set(self.topics) - set(classes))
            if missing:
                raise ValueError(f"chatterbot: unknown topics {missing}; available: {sorted(classes)}")
        return {k: list(dict.fromkeys(v)) for k, v in classes.items() if len(v) >= 2}

    def load(self) -> DatasetSplits:
        classes = self._classes()
        rng = np.random.default_rng(self.seed)
        examples: list[Example] = []
        label_names = sorted(classes)
        for label, cls in enumerate(label_names):
            texts = classes[cls]
            if self.max_per_class is not None and len(texts) > self.max_per_class:
                keep = np.sort(rng.choice(len(texts), self.max_per_class, replace=False))
                texts = [texts[i] for i in keep]
            examples.extend({"text": t, "label": label} for t in texts)
        train_idx, val_idx = split_train_val(len(examples), self.val_fraction, self.seed)
        return DatasetSplits(
            train=[examples[i] for i in train_idx], val=[examples[i] for i in val_idx], label_names=label_names
        )


@hookimpl
def fedlight_datasets() -> list[type]:
    return [ChatterbotCorpus]
