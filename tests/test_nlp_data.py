"""NLP dataset plugins: chatterbot dialogue pairs and user JSONL/CSV files."""

from __future__ import annotations

import json

import pytest

from fedlight.data.files import Files
from fedlight.data.instructions import ChatterbotDialogue, dialogue_pairs


def test_dialogue_pairs_are_consecutive_turns():
    assert dialogue_pairs(["a", " b ", "", "c", 3]) == [("a", "b"), ("b", "c")]
    assert dialogue_pairs(["only one"]) == []


def test_chatterbot_dialogue_groups_are_topic_files():
    splits = ChatterbotDialogue(topics=["greetings", "humor"], val_fraction=0.25).load()
    assert splits.num_classes == 0 and splits.label_names == []
    assert len(splits.groups) == len(splits.train) and set(splits.groups) == {"english/greetings", "english/humor"}
    assert all(set(ex) == {"prompt", "response"} and ex["prompt"] and ex["response"] for ex in splits.train + splits.val)
    assert {"prompt": "Hello", "response": "Hi"} in splits.train + splits.val
    again = ChatterbotDialogue(topics=["greetings", "humor"], val_fraction=0.25).load()
    assert again.train == splits.train  # seeded


def test_chatterbot_dialogue_cap_and_errors():
    assert len(ChatterbotDialogue(max_pairs=20).load().train) == 16
    with pytest.raises(ValueError, match="unknown topics"):
        ChatterbotDialogue(topics=["nope"]).load()
    with pytest.raises(ValueError, match="unknown languages"):
        ChatterbotDialogue(languages=["klingon"]).load()
    with pytest.raises(ValueError, match="max_pairs"):
        ChatterbotDialogue(max_pairs=1)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    return path


def test_jsonl_classification_labels_sorted_and_groups(tmp_path):
    rows = [{"text": f"t{i}", "label": lab, "group": f"u{i % 3}"} for i, lab in enumerate(["pos", "neg", "neutral"] * 4)]
    splits = Files(str(_jsonl(tmp_path / "d.jsonl", rows)), val_fraction=0.25).load()
    assert splits.label_names == ["neg", "neutral", "pos"]
    assert len(splits.train) == 9 and len(splits.val) == 3
    by_text = {r["text"]: r for r in rows}
    for ex, group in zip(splits.train, splits.groups):
        assert ex["label"] == splits.label_names.index(by_text[ex["text"]]["label"])
        assert group == by_text[ex["text"]]["group"]


def test_numeric_labels_sort_numerically(tmp_path):
    rows = [{"text": str(i), "label": lab} for i, lab in enumerate([10, 2, 1, 2])]
    splits = Files(str(_jsonl(tmp_path / "d.jsonl", rows)), val_fraction=0.25).load()
    assert splits.label_names == ["1", "2", "10"]


def test_csv_generation_with_val_path(tmp_path):
    (tmp_path / "train.csv").write_text('prompt,response\nhi,hello\n"a, b","c\nd"\n¿Qué?,你好\n', encoding="utf-8")
    (tmp_path / "val.csv").write_text("prompt,response\nbye,see you\n", encoding="utf-8")
    splits = Files(str(tmp_path / "train.csv"), val_path=str(tmp_path / "val.csv")).load()
    assert splits.train == [
        {"prompt": "hi", "response": "hello"},
        {"prompt": "a, b", "response": "c\nd"},
        {"prompt": "¿Qué?", "response": "你好"},
    ]
    assert splits.val == [{"prompt": "bye", "response": "see you"}]
    assert splits.label_names == [] and splits.groups is None


def test_missing_column_file_and_values_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"files\.path.*does not exist"):
        Files(str(tmp_path / "missing.jsonl")).load()
    with pytest.raises(FileNotFoundError, match=r"files\.val_path"):
        Files(str(_jsonl(tmp_path / "ok.jsonl", [{"text": "a", "label": "x"}])), val_path=str(tmp_path / "no.csv")).load()
    with pytest.raises(ValueError, match=r"columns \['label', 'txt'\].*'text' and 'label'"):
        Files(str(_jsonl(tmp_path / "bad.jsonl", [{"txt": "a", "label": "x"}] * 3))).load()
    (tmp_path / "bad.csv").write_text("prompt,answer\nhi,hello\n")
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        Files(str(tmp_path / "bad.csv")).load()
    with pytest.raises(ValueError, match="row 2 has no value in column 'label'"):
        Files(str(_jsonl(tmp_path / "gap.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}]))).load()
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="files.format"):
        Files(str(tmp_path / "data.txt")).load()
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        Files(str(tmp_path / "broken.jsonl")).load()
    with pytest.raises(ValueError, match="val_fraction"):
        Files("x.jsonl", val_fraction=1.5)


def test_registered():
    from fedlight.plugins import build_registry

    registry = build_registry(autoload=False)
    assert registry.get("datasets", "files").cls is Files
    assert registry.get("datasets", "chatterbot_dialogue").cls is ChatterbotDialogue
