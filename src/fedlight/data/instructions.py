"""Prompt -> response pairs from the dialogue of the pip package ``chatterbot-corpus`` (BSD-3-Clause)."""

from __future__ import annotations

import yaml

from fedlight.data.base import Dataset, DatasetSplits, split_train_val
from fedlight.data.chatterbot import _corpus_root
from fedlight.hookspecs import hookimpl


def dialogue_pairs(conversation: list) -> list[tuple[str, str]]:
    """Consecutive turns of one conversation as (prompt, response) pairs; blank turns are skipped."""
    turns = [t.strip() for t in conversation if isinstance(t, str) and t.strip()]
    return list(zip(turns[:-1], turns[1:]))


class ChatterbotDialogue(Dataset):
    """Human-written chatbot dialogue as prompt -> response pairs, grouped by topic file.

    Every pair of consecutive turns of a conversation becomes ``{"prompt", "response"}``; exact
    duplicate pairs within a topic are dropped. ``groups`` holds each training pair's topic file
    (``language/topic``) so a natural-id partitioner can give each client one or more topics.
    ``max_pairs`` caps the total (seeded sample) to keep runs short.
    """

    name = "chatterbot_dialogue"
    example_args = {"topics": ["greetings", "humor"], "max_pairs": 40}

    def __init__(
        self,
        languages: list[str] | None = None,
        topics: list[str] | None = None,
        max_pairs: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if max_pairs is not None and max_pairs < 2:
            raise ValueError(f"max_pairs must be >= 2 or null, got {max_pairs}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.languages = languages or ["english"]
        self.topics = topics
        self.max_pairs = max_pairs
        self.val_fraction = val_fraction
        self.seed = seed

    def pairs(self) -> list[tuple[str, str, str]]:
        """(group, prompt, response) for every pair, in corpus order."""
        root = _corpus_root()
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        unknown = [lang for lang in self.languages if lang not in available]
        if unknown:
            raise ValueError(f"chatterbot_dialogue: unknown languages {unknown}; available: {available}")
        out: list[tuple[str, str, str]] = []
        seen_topics: set[str] = set()
        for lang in self.languages:
            for f in sorted((root / lang).iterdir(), key=lambda p: p.name):
                if not f.name.endswith(".yml"):
                    continue
                topic = f.name[:-4]
                seen_topics.add(topic)
                if self.topics is not None and topic not in self.topics:
                    continue
                doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
                unique: dict[tuple[str, str], None] = {}
                for conv in doc.get("conversations") or []:
                    for pair in dialogue_pairs(conv if isinstance(conv, list) else []):
                        unique.setdefault(pair, None)
                out.extend((f"{lang}/{topic}", p, r) for p, r in unique)
        if self.topics is not None:
            missing = sorted(set(self.topics) - seen_topics)
            if missing:
                raise ValueError(f"chatterbot_dialogue: unknown topics {missing}; available: {sorted(seen_topics)}")
        return out

    def load(self) -> DatasetSplits:
        import numpy as np

        pairs = self.pairs()
        if len(pairs) < 2:
            raise ValueError("chatterbot_dialogue: fewer than 2 prompt/response pairs; widen languages/topics")
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(pairs), self.max_pairs, replace=False))
            pairs = [pairs[i] for i in keep]
        train_idx, val_idx = split_train_val(len(pairs), self.val_fraction, self.seed)

        def ex(i: int) -> dict[str, str]:
            return {"prompt": pairs[i][1], "response": pairs[i][2]}

        return DatasetSplits(
            train=[ex(i) for i in train_idx],
            val=[ex(i) for i in val_idx],
            label_names=[],
            groups=[pairs[i][0] for i in train_idx],
        )


@hookimpl
def fedlight_datasets() -> list[type]:
    return [ChatterbotDialogue]
