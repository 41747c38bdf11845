"""Write configs/data/chatterbot_sites.parquet: a small "bring your own data" example table.

Columns ``utterance`` (real chatterbot-corpus text), ``language`` (the label, a string) and ``site`` (the
corpus topic file the utterance comes from: a natural client id, each site holding several languages).
At most 12 utterances per (language, site), seeded. Regenerate with
``python configs/data/make_chatterbot_sites.py`` (needs the datasets package).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from fedlight.data.chatterbot import _corpus_root, _utterances

LANGUAGES = ["english", "spanish", "portuguese", "italian"]
PER_CELL = 12


def rows() -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[str]] = {"utterance": [], "language": [], "site": []}
    for lang in LANGUAGES:
        for topic, texts in _utterances(_corpus_root() / lang).items():
            keep = np.sort(rng.permutation(len(texts))[:PER_CELL])
            for i in keep:
                out["utterance"].append(texts[i])
                out["language"].append(lang)
                out["site"].append(topic)
    return out


if __name__ == "__main__":
    target = Path(__file__).with_name("chatterbot_sites.parquet")
    datasets.Dataset.from_dict(rows()).to_parquet(str(target))
    print(f"wrote {target} ({target.stat().st_size} bytes)")
