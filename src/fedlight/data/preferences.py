"""Preference pairs from real chatbot dialogue (``chatterbot-corpus``, BSD-3): the real reply vs another one."""

from __future__ import annotations

import numpy as np

from fedlight.data.base import Dataset, DatasetSplits, split_train_val
from fedlight.data.instructions import ChatterbotDialogue
from fedlight.hookspecs import hookimpl


class ChatterbotPreferences(Dataset):
    """DPO demo data: each dialogue turn's real reply is ``chosen``, a reply from another topic's conversation ``rejected``.

    Built from :class:`~fedlight.data.instructions.ChatterbotDialogue` pairs: for every (prompt,
    response) the rejected answer is a seeded draw among responses of *other* topic files (so it
    comes from another conversation and is off-topic, never a paraphrase of the real reply).
    ``groups`` holds the topic file, for ``natural_id`` or ``metadata`` (column ``group``) splits.
    """

    name = "chatterbot_preferences"
    example_args = {"topics": ["greetings", "humor"], "max_pairs": 40}

    def __init__(
        self,
        languages: list[str] | None = None,
        topics: list[str] | None = None,
        max_pairs: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.dialogue = ChatterbotDialogue(languages, topics, None, val_fraction, seed)  # validates the arguments
        if max_pairs is not None and max_pairs < 2:
            raise ValueError(f"max_pairs must be >= 2 or null, got {max_pairs}")
        self.max_pairs, self.val_fraction, self.seed = max_pairs, val_fraction, seed

    def load(self) -> DatasetSplits:
        pairs = self.dialogue.pairs()
        groups = np.asarray([g for g, _, _ in pairs])
        if len(set(groups.tolist())) < 2:
            raise ValueError("chatterbot_preferences needs >= 2 topics (rejected replies come from another topic)")
        rng = np.random.default_rng(self.seed)
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            keep = np.sort(rng.choice(len(pairs), self.max_pairs, replace=False))
        else:
            keep = np.arange(len(pairs))
        examples, kept_groups = [], []
        for i in keep:
            group, prompt, chosen = pairs[i]
            others = np.flatnonzero(groups != group)
            rejected = chosen
            while rejected == chosen:  # another topic can repeat a reply verbatim ("Yes.")
                rejected = pairs[int(rng.choice(others))][2]
            examples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            kept_groups.append(group)
        train_idx, val_idx = split_train_val(len(examples), self.val_fraction, self.seed)
        return DatasetSplits(
            train=[examples[i] for i in train_idx],
            val=[examples[i] for i in val_idx],
            label_names=[],
            groups=[kept_groups[i] for i in train_idx],
        )


@hookimpl
def fedlight_datasets() -> list[type]:
    return [ChatterbotPreferences]
