"""Label-free partitioners on real text: alpha -> inf approaches IID, small alpha concentrates keys, seeded.

The divergence is the mean over clients of the total-variation distance between the client's
key distribution (topic cluster / metadata value / length bin) and the pooled one
(``fedlight.report.partitions.tv_distances``): 0 for IID, near 1 when clients see one key value.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import text_config

from fedlight.partitioners.iid import IID
from fedlight.partitioners.length_skew import LengthSkew
from fedlight.partitioners.metadata import Metadata
from fedlight.partitioners.topic_clusters import TopicClusters
from fedlight.report.partitions import label_histograms, skew_summary

NUM_CLIENTS = 10


@pytest.fixture(scope="module")
def dialogue():
    from fedlight.data.instructions import ChatterbotDialogue

    return ChatterbotDialogue(max_pairs=300, seed=0).load()


def _tv(part, splits, seed: int) -> float:
    parts = part(splits.train_labels(), NUM_CLIENTS, seed, groups=splits.groups, examples=splits.train)
    key = part.partition_key(splits.train, splits.groups, seed)
    return skew_summary(label_histograms(parts, key.ids, key.num_values))["mean_tv"]


def _iid_tv(part, splits, seed: int) -> float:
    key = part.partition_key(splits.train, splits.groups, seed)
    parts = IID()(splits.train_labels(), NUM_CLIENTS, seed)
    return skew_summary(label_histograms(parts, key.ids, key.num_values))["mean_tv"]


@pytest.mark.parametrize(
    "make",
    [
        lambda a: TopicClusters(num_clusters=6, alpha=a, min_size=1, cluster_seed=0),
        lambda a: Metadata(column="group", alpha=a, min_size=1),
        lambda a: LengthSkew(bins=5, alpha=a, min_size=1),
    ],
    ids=["topic_clusters", "metadata", "length_skew"],
)
def test_alpha_moves_from_concentrated_to_iid(dialogue, make):
    seeds = (0, 1, 2)
    tv = {a: float(np.mean([_tv(make(a), dialogue, s) for s in seeds])) for a in (0.05, 1.0, 1000.0)}
    iid = float(np.mean([_iid_tv(make(1.0), dialogue, s) for s in seeds]))
    print(f"mean TV: alpha 0.05 {tv[0.05]:.3f}, 1 {tv[1.0]:.3f}, 1000 {tv[1000.0]:.3f}; iid {iid:.3f}")
    assert tv[0.05] > tv[1.0] > tv[1000.0]
    assert tv[0.05] > 0.5  # small alpha: clients concentrate on a few key values
    assert tv[1000.0] < iid + 0.03  # alpha -> inf: as close to the pooled mix as a random IID split


def test_same_seed_same_split(dialogue):
    for part in (TopicClusters(num_clusters=5, min_size=1), Metadata(min_size=1), LengthSkew(min_size=1)):
        a, b, c = (part(dialogue.train_labels(), 6, s, groups=dialogue.groups, examples=dialogue.train) for s in (4, 4, 5))
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), part.name
        assert any(not np.array_equal(x, y) for x, y in zip(a, c)), part.name
        joined = np.sort(np.concatenate(a))
        assert np.array_equal(joined, np.arange(len(dialogue.train)))  # disjoint and covering


def test_topic_clusters_are_real_topics(dialogue):
    """k-means on MiniLM embeddings recovers the corpus' topic files far better than chance."""
    from sklearn.metrics import adjusted_rand_score

    key = TopicClusters(num_clusters=8).partition_key(dialogue.train, dialogue.groups, 0)
    assert len(key.names) == 8 and np.bincount(key.ids)[0] == np.bincount(key.ids).max()  # 0 = largest
    assert adjusted_rand_score(dialogue.groups, key.ids) > 0.1


def test_per_value_mode_gives_one_value_per_client(dialogue):
    values = sorted(set(dialogue.groups))
    part = Metadata(column="group", mode="per_value")
    parts = part(dialogue.train_labels(), len(values), 0, groups=dialogue.groups, examples=dialogue.train)
    groups = np.asarray(dialogue.groups)
    assert sorted(len(set(groups[p])) for p in parts) == [1] * len(values)
    with pytest.raises(ValueError, match="exceeds the"):
        part(dialogue.train_labels(), len(values) + 1, 0, groups=dialogue.groups, examples=dialogue.train)


def test_length_bins_hold_equal_counts_and_skew_lengths(dialogue):
    part = LengthSkew(bins=4, alpha=0.05, min_size=1)
    key = part.partition_key(dialogue.train, None, 0)
    counts = np.bincount(key.ids)
    assert counts.max() - counts.min() <= 1
    lengths = np.asarray([part.length(e) for e in dialogue.train])
    parts = part(dialogue.train_labels(), NUM_CLIENTS, 0, examples=dialogue.train)
    iid = IID()(dialogue.train_labels(), NUM_CLIENTS, 0)
    spread = np.std([lengths[p].mean() for p in parts])
    assert spread > 2 * np.std([lengths[p].mean() for p in iid])  # clients differ in typical length


def test_bad_inputs_fail_with_what_to_change():
    examples = [{"prompt": f"p{i}", "response": "r"} for i in range(20)]
    with pytest.raises(ValueError, match="not a field of the examples"):
        Metadata(column="task")(np.zeros(20), 2, 0, examples=examples)
    with pytest.raises(ValueError, match="no field 'body'"):
        LengthSkew(field="body")(np.zeros(20), 2, 0, examples=examples)
    with pytest.raises(ValueError, match="mode must be"):
        TopicClusters(mode="random")
    with pytest.raises(ValueError, match="splits by the examples"):
        LengthSkew()(np.zeros(20), 2, 0)


def test_partitions_command_shows_topic_cluster_histograms(tiny_gpt2_dir, tmp_path, capsys):
    from fedlight.cli import main

    cfg = text_config(
        tiny_gpt2_dir, tmp_path,
        model={"task": {"class_path": "causal_lm", "init_args": {"model_name_or_path": str(tiny_gpt2_dir)}}},
        data={"dataset": {"class_path": "chatterbot_dialogue", "init_args": {"max_pairs": 300}},
              "partitioner": {"class_path": "topic_clusters", "init_args": {"num_clusters": 6, "alpha": 0.1, "min_size": 1}},
              "num_clients": 5},
    )  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["partitions", "--config", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "partition key: topic cluster (topic_clusters)" in out and "topic cluster skew: mean TV" in out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
