"""The hf_dataset plugin on real files the tests write: parquet, JSON Lines, CSV, Arrow and save_to_disk folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
import torch
from conftest import TINY_VIT, round_callback, run_fit, text_config, vision_config

from fedlight.data.base import split_train_val
from fedlight.data.hf_datasets import HFDataset, to_image_tensor
from fedlight.errors import ConfigError

FORMATS = ["parquet", "jsonl", "csv", "tsv", "arrow", "disk", "disk_dict"]
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "maple",
    "ember",
    "violet",
    "orbit",
    "quartz",
    "lantern",
    "meadow",
    "harbor",
]


def random_rows(seed: int, n: int = 24, labels=("pos", "neg", "neutral")) -> list[dict]:
    """A seeded table with awkward text (commas, quotes, unicode) in user-named columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(1, 6))]
        rows.append(
            {
                "review": f'{" ".join(words)}, "{i}" ñ',
                "stars": labels[int(rng.integers(0, len(labels)))],
                "user": f"u{int(rng.integers(0, 4))}",
                "source": ["web", "app"][i % 2],
            }
        )
    return rows


def write(rows: list[dict], fmt: str, folder: Path, name: str = "data") -> Path:
    """``rows`` in format ``fmt`` (one split; ``disk_dict`` is a DatasetDict with only ``train``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        path = folder / f"{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        path = folder / f"{name}.{fmt}"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "arrow":
        path = folder / f"{name}.arrow"
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif fmt == "disk":
        path = folder / name
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "disk_dict":
        path = folder / name
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return path


def image_table(images: list, labels: list, image: str = "image", label: str = "label") -> datasets.Dataset:
    """Images encoded by datasets' own ``Image`` feature (PNG bytes), as a user's table would hold them."""
    features = datasets.Features(
        {image: datasets.Image(), label: datasets.Value("string" if isinstance(labels[0], str) else "int64")}
    )
    return datasets.Dataset.from_dict({image: images, label: labels}, features=features)


def hf(path, tmp_path, **kwargs) -> HFDataset:
    return HFDataset(str(path), cache_dir=str(tmp_path / "hf-cache"), **kwargs)


REVIEWS = {"columns": {"text": "review", "label": "stars"}, "group": "user", "metadata": ["source"]}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_format_gives_the_expected_examples(fmt, seed, tmp_path):
    """Each format gives exactly the rows of the seeded split, with sorted label ids, groups and metadata."""
    rows = random_rows(seed)
    splits = hf(write(rows, fmt, tmp_path), tmp_path, val_fraction=0.25, seed=seed, **REVIEWS).load()
    names = sorted({r["stars"] for r in rows})
    assert splits.label_names == names
    train_idx, val_idx = split_train_val(len(rows), 0.25, seed)

    def expected(r):
        return {"text": r["review"], "label": names.index(r["stars"]), "source": r["source"]}

    assert splits.train == [expected(rows[i]) for i in train_idx]
    assert splits.val == [expected(rows[i]) for i in val_idx]
    assert splits.groups == [rows[i]["user"] for i in train_idx]


def test_validation_split_by_name_and_by_val_path(tmp_path):
    train_rows, val_rows = random_rows(0, 20), random_rows(1, 7)
    ds = {k: datasets.Dataset.from_list(v) for k, v in (("train", train_rows), ("test", val_rows))}
    datasets.DatasetDict(ds).save_to_disk(str(tmp_path / "dd"))
    # no validation split: `test` is picked; the training split is not split again
    auto = hf(tmp_path / "dd", tmp_path, **REVIEWS).load()
    assert [e["text"] for e in auto.train] == [r["review"] for r in train_rows]
    assert [e["text"] for e in auto.val] == [r["review"] for r in val_rows]
    # train on `test`, validate on a seeded share of it
    swapped = hf(tmp_path / "dd", tmp_path, train_split="test", val_fraction=0.5, **REVIEWS).load()
    assert len(swapped.train) + len(swapped.val) == len(val_rows) and len(swapped.val) == 4
    # separate files
    files = hf(
        write(train_rows, "parquet", tmp_path, "tr"),
        tmp_path,
        val_path=str(write(val_rows, "jsonl", tmp_path, "va")),
        format="auto",
        **REVIEWS,
    )
    with pytest.raises(ValueError, match="mixed formats"):
        files.load()
    split = hf(write(train_rows, "parquet", tmp_path, "tr"), tmp_path, val_path=str(write(val_rows, "parquet", tmp_path, "va")), **REVIEWS).load()  # fmt: skip
    assert [e["text"] for e in split.val] == [r["review"] for r in val_rows]
    assert split.label_names == sorted({r["stars"] for r in train_rows + val_rows})


def test_glob_reads_every_matching_file(tmp_path):
    a, b = random_rows(0, 10), random_rows(1, 10)
    write(a, "parquet", tmp_path / "parts", "part-0")
    write(b, "parquet", tmp_path / "parts", "part-1")
    splits = hf(tmp_path / "parts" / "*.parquet", tmp_path, val_fraction=0.1, **REVIEWS).load()
    assert sorted(e["text"] for e in splits.train + splits.val) == sorted(r["review"] for r in a + b)


def test_labels_ints_numeric_order_and_classlabel_names(tmp_path):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 1, 2, 10, 1, 1, 2])]
    splits = hf(write(rows, "parquet", tmp_path), tmp_path, val_fraction=0.25).load()
    assert splits.label_names == ["1", "2", "10"]
    by_text = {r["text"]: r["label"] for r in rows}
    assert all(splits.label_names[e["label"]] == str(by_text[e["text"]]) for e in splits.train + splits.val)
    # a ClassLabel keeps its own (unsorted) names and ids, including a class no example has
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg", "unused"])}
    )
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [1, 0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds.select([0, 1])}).save_to_disk(str(tmp_path / "cl"))
    cl = hf(tmp_path / "cl", tmp_path).load()
    assert cl.label_names == ["pos", "neg", "unused"] and cl.num_classes == 3
    assert [e["label"] for e in cl.train] == [1, 0, 1, 1] and [e["label"] for e in cl.val] == [1, 0]


def test_prompt_response_and_preferences(tmp_path):
    qa = [{"question": f"q{i}?", "answer": f"a{i}.", "site": f"s{i % 2}"} for i in range(10)]
    gen = hf(
        write(qa, "jsonl", tmp_path), tmp_path, columns={"prompt": "question", "response": "answer"}, group="site"
    ).load()
    assert gen.label_names == [] and gen.num_classes == 0
    assert all(set(e) == {"prompt", "response"} and e["response"] == "a" + e["prompt"][1:-1] + "." for e in gen.train)
    assert gen.groups == ["s" + str(int(e["prompt"][1:-1]) % 2) for e in gen.train]
    prefs = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(6)]
    pref = hf(write(prefs, "csv", tmp_path, "prefs"), tmp_path).load()
    assert all(e == {"prompt": e["prompt"], "chosen": "yes", "rejected": "no"} for e in pref.train + pref.val)


def test_images_pil_and_arrays_become_unit_tensors(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (6, 6), dtype=np.uint8) for _ in range(8)]
    table = image_table(grey, ["cat", "dog"] * 4, "img", "label")
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(tmp_path / "imgs"))
    splits = hf(tmp_path / "imgs", tmp_path, columns={"image": "img"}).load()
    assert splits.label_names == ["cat", "dog"]
    for ex, arr in zip(splits.train, grey):
        assert ex["image"].dtype == torch.float32 and ex["image"].shape == (1, 6, 6)
        assert torch.equal(ex["image"][0], torch.from_numpy(arr.astype(np.float32) / 255.0))
    # RGB parquet images, resized at load; the tiny ViT's collate stacks them
    rgb = [rng.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(6)]
    table = image_table(rgb, [0, 1, 2] * 2, "image", "label")
    table.to_parquet(str(tmp_path / "rgb.parquet"))
    image_table(rgb[:3] + [np.zeros((4, 4, 3), np.uint8)] * 3, [0, 1] * 3).to_parquet(str(tmp_path / "mixed.parquet"))
    with pytest.raises(ValueError, match=r"images come in 2 sizes .*set hf_dataset\.image_size"):
        hf(tmp_path / "mixed.parquet", tmp_path).load()
    resized = hf(tmp_path / "rgb.parquet", tmp_path, image_size=16, val_fraction=0.5).load()
    assert {tuple(e["image"].shape) for e in resized.train + resized.val} == {(3, 16, 16)}
    from fedlight.tasks.image_classification import ImageClassification

    batch = ImageClassification(**TINY_VIT["init_args"]).collate(resized.train)
    assert batch["images"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [e["label"] for e in resized.train]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 5), 255, np.uint8), (1, 4, 5, 1.0)),
        (np.full((4, 5, 3), 51, np.uint8), (3, 4, 5, 0.2)),
        (np.full((3, 4, 5), 0.5, np.float32), (3, 4, 5, 0.5)),
        (np.full((4, 5, 4), 255, np.uint8), (3, 4, 5, 1.0)),  # alpha dropped
        (np.full((1, 4, 5), 0.25, np.float64), (1, 4, 5, 0.25)),
    ],
)
def test_image_array_layouts(array, expected):
    out = to_image_tensor(array)
    assert tuple(out.shape) == expected[:3] and out.dtype == torch.float32
    assert torch.allclose(out, torch.full(expected[:3], expected[3]))


def test_mixed_grey_and_rgb_are_all_rgb(tmp_path):
    imgs = [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)] * 3
    table = image_table(imgs, [0, 1] * 3, "image", "label")
    table.save_to_disk(str(tmp_path / "mix"))
    splits = hf(tmp_path / "mix", tmp_path).load()
    assert {tuple(e["image"].shape) for e in splits.train + splits.val} == {(3, 4, 4)}


@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_tables_keep_every_row_once(seed, tmp_path):
    """Seeded random tables, label types and caps: ids in range, every row in at most one split, groups aligned."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 40))
    labels = [int(v) for v in rng.integers(-3, 30, 5)] if seed % 2 else [f"L{v}" for v in rng.integers(0, 9, 4)]
    rows = random_rows(seed, n, labels=tuple(labels))
    for i, r in enumerate(rows):
        r["review"] = f"{i}:{r['review']}"
    fmt = FORMATS[seed % len(FORMATS)]
    max_train = int(rng.integers(1, n + 2)) if seed % 3 == 0 else None
    ds = hf(write(rows, fmt, tmp_path), tmp_path, val_fraction=float(rng.uniform(0.05, 0.6)), seed=seed,
            max_train=max_train, **REVIEWS)  # fmt: skip
    splits = ds.load()
    names = splits.label_names
    assert names == sorted(names, key=lambda s: (0, float(s), s) if s.lstrip("-").isdigit() else (1, 0.0, s))
    seen = [int(e["text"].split(":")[0]) for e in splits.train + splits.val]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))
    assert len(splits.val) >= 1 and (max_train is None or len(splits.train) <= max_train)
    for ex in splits.train + splits.val:
        assert names[ex["label"]] == str(rows[int(ex["text"].split(":")[0])]["stars"])
    assert splits.groups == [rows[int(e["text"].split(":")[0])]["user"] for e in splits.train]
    assert ds.load().train == splits.train  # seeded


# -- bad configs: a generated table, each with the message it must give -------------------------------------
BASE = [{"text": f"t{i}", "label": ["a", "b"][i % 2], "group": f"g{i % 3}", "src": "x"} for i in range(8)]


def _rows_with(**changes):
    def make(i, r):
        return {**r, **{k: v(i) if callable(v) else v for k, v in changes.items()}}

    return [make(i, r) for i, r in enumerate(BASE)]


def _drop(column):
    return [{k: v for k, v in r.items() if k != column} for r in BASE]


#: defect -> (rows, init kwargs, message regex); crossed with every file format below
DEFECTS = {
    "mapped column missing": (
        BASE,
        {"columns": {"text": "review"}},
        r"hf_dataset\.columns: .*missing columns \(classification needs 'review'\).*available|has columns \['group', 'label', 'src', 'text'\]",
    ),
    "no label column": (
        _drop("label"),
        {},
        r"hf_dataset\.columns: .* has columns \['group', 'src', 'text'\]; missing columns .*classification needs 'label'",
    ),
    "group column missing": (
        BASE,
        {"group": "site"},
        r"hf_dataset\.group: .*no column 'site'; available: \['group', 'label', 'src', 'text'\]",
    ),
    "metadata column missing": (BASE, {"metadata": ["task"]}, r"hf_dataset\.metadata: .*no column 'task'; available"),
    "unknown val split": (
        BASE,
        {"val_split": "dev"},
        r"hf_dataset\.val_split: .*no split 'dev'; available: \['train'\]",
    ),
    "float labels": (
        _rows_with(label=lambda i: i + 0.5),
        {},
        r"hf_dataset\.columns\.label: .*row 1 has the float label 0\.5 in column 'label'",
    ),
    "empty label": (
        _rows_with(label=lambda i: "" if i == 3 else "a"),
        {},
        r"hf_dataset\.columns\.label: split '(train|validation)' row \d+ has no label",
    ),
    "empty text": (
        _rows_with(text=lambda i: " " if i == 5 else f"t{i}"),
        {},
        r"hf_dataset: split '(train|validation)' row \d+ has no value in column 'text'",
    ),
    "empty group": (
        _rows_with(group=lambda i: "" if i in (0, 1, 2, 4, 6, 7) else "g"),
        {},
        r"hf_dataset\.group: column 'group' is empty in \d+ training rows",
    ),
    "one row": (BASE[:1], {}, r"has 1 row; it needs >= 2 to split off validation"),
}
BAD_FORMATS = ["parquet", "jsonl", "csv", "disk"]


@pytest.mark.parametrize("fmt", BAD_FORMATS)
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_bad_tables_fail_with_the_option_named(defect, fmt, tmp_path):
    rows, kwargs, message = DEFECTS[defect]
    path = write(rows, fmt, tmp_path)
    with pytest.raises(ValueError, match=message):
        hf(path, tmp_path, **kwargs).load()


def test_bad_paths_and_options(tmp_path):
    """Everything that is not local, readable data fails with a message that says what to change."""
    write(BASE, "parquet", tmp_path, "ok")
    (tmp_path / "plain").mkdir()
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    empty = datasets.Dataset.from_dict(
        {"text": [], "label": []},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": datasets.Dataset.from_list(BASE), "validation": empty}).save_to_disk(
        str(tmp_path / "emptyval")
    )
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    (tmp_path / "blank.csv").write_text("")
    cases = [
        ("imdb", {}, FileNotFoundError, r"'imdb' is not a local file or folder\. hf_dataset reads local data only, never the Hugging Face Hub.*save_to_disk"),
        ("stanfordnlp/sst2", {}, FileNotFoundError, r"hf_dataset\.path: 'stanfordnlp/sst2' is not a local file"),
        (str(tmp_path / "nope.parquet"), {}, FileNotFoundError, r"is not a local file or folder"),
        (str(tmp_path / "*.tsv"), {}, FileNotFoundError, r"pattern .* matches no local files"),
        (str(tmp_path / "plain"), {}, ValueError, r"is a folder but not a save_to_disk output.*plain/\*\.parquet"),
        (str(tmp_path / "plain"), {"format": "disk"}, FileNotFoundError, r"is not a save_to_disk folder"),
        (str(tmp_path / "data.xlsx"), {}, ValueError, r"unsupported file type 'data\.xlsx'; supported suffixes: .*\.parquet.*hf_dataset\.format"),
        (str(tmp_path / "broken.jsonl"), {}, ValueError, r"hf_dataset\.path: cannot read .*broken\.jsonl.* as json"),
        (str(tmp_path / "emptyval"), {}, ValueError, r"split 'validation' of .* is empty"),
        (str(tmp_path / "emptyval"), {"train_split": "training"}, ValueError, r"hf_dataset\.train_split: .*no split 'training'; available: \['train', 'validation'\]"),
        (str(tmp_path / "emptyval"), {"val_split": "dev"}, ValueError, r"hf_dataset\.val_split: .*no split 'dev'; available: \['train', 'validation'\]"),
        (str(tmp_path / "blank.csv"), {}, ValueError, r"split 'train' of .*blank\.csv' is empty"),
        (str(tmp_path / "empty.parquet"), {}, ValueError, r"split 'train' of .* is empty"),
        (str(tmp_path / "emptyval"), {"val_path": str(tmp_path / "ok.parquet")}, ValueError, r"hf_dataset\.val_path: .* is a save_to_disk folder.*val_split"),
        (str(tmp_path / "ok.parquet"), {"val_path": str(tmp_path / "missing.csv")}, FileNotFoundError, r"hf_dataset\.val_path: .*missing\.csv"),
    ]  # fmt: skip
    for path, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            hf(path, tmp_path, **kwargs).load()
    constructor = [
        ({"val_fraction": 1.0}, r"hf_dataset\.val_fraction must be in \(0, 1\), got 1\.0"),
        ({"val_fraction": 0}, r"hf_dataset\.val_fraction"),
        (
            {"columns": {"txt": "review"}},
            r"hf_dataset\.columns: unknown fields \['txt'\]; map any of \['text', 'label'",
        ),
        ({"format": "excel"}, r"hf_dataset\.format must be auto, disk, parquet, json, csv or arrow"),
        ({"max_train": 0}, r"hf_dataset\.max_train must be >= 1"),
        ({"image_size": -2}, r"hf_dataset\.image_size must be >= 1"),
        ({"val_split": "train"}, r"hf_dataset\.val_split and train_split are both 'train'"),
        ({"format": "disk", "val_path": "x.csv"}, r"hf_dataset\.val_path is for data files"),
        ({"metadata": ["source", "label"]}, r"hf_dataset\.metadata: \['label'\] are fedlight's own example fields"),
    ]
    for kwargs, message in constructor:
        with pytest.raises(ValueError, match=message):
            HFDataset("ok.parquet", **kwargs)


def test_registered_as_a_builtin_dataset():
    from fedlight.plugins import build_registry

    assert build_registry(autoload=False).get("datasets", "hf_dataset").cls is HFDataset
    assert HFDataset.summary().startswith("Your data as Hugging Face datasets")


# -- real runs -------------------------------------------------------------------------------------------------
def _site_table(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Real chatterbot utterances in user column names: language label, four 'sites' (natural clients)."""
    from fedlight.data.chatterbot import ChatterbotCorpus

    splits = ChatterbotCorpus(languages=["english", "spanish", "italian"], max_per_class=24).load()
    rows = [
        {"utterance": e["text"], "lang": splits.label_names[e["label"]], "site": f"site-{i % 4}"}
        for i, e in enumerate(splits.train + splits.val)
    ]
    return write(rows, "parquet", tmp_path, "sites"), rows


def test_fit_on_parquet_with_natural_sites(tiny_bert_dir, tmp_path):
    """`fedlight fit` on the tiny BERT over a parquet table, natural_id clients = the table's sites."""
    path, rows = _site_table(tmp_path)
    dataset = {"class_path": "hf_dataset", "init_args": {
        "path": str(path), "columns": {"text": "utterance", "label": "lang"}, "group": "site",
        "cache_dir": str(tmp_path / "hf-cache"),
    }}  # fmt: skip
    cfg = text_config(tiny_bert_dir, tmp_path, data={"dataset": dataset, "partitioner": "natural_id", "num_clients": 4})
    cli = run_fit(cfg, tmp_path)
    fed, dm = round_callback(cli), cli.datamodule
    assert [r["round"] for r in fed.history] == [0, 1, 2] and all(r["num_clients"] == 2 for r in fed.history[1:])
    assert dm.splits.label_names == ["english", "italian", "spanish"] and cli.model.model.config.num_labels == 3
    site_of = {r["utterance"]: r["site"] for r in rows}
    client_sites = [{site_of[dm.splits.train[i]["text"]] for i in idx} for idx in dm.client_indices]
    assert sorted(s for sites in client_sites for s in sites) == ["site-0", "site-1", "site-2", "site-3"]
    assert all(len(sites) == 1 for sites in client_sites)  # one site per client, never split
    assert sum(len(ix) for ix in dm.client_indices) == len(dm.splits.train)


def test_fit_refuses_a_missing_column_before_training(tiny_bert_dir, tmp_path):
    path, _ = _site_table(tmp_path)
    dataset = {"class_path": "hf_dataset", "init_args": {"path": str(path), "columns": {"text": "utterance", "label": "language"}, "cache_dir": str(tmp_path / "c")}}  # fmt: skip
    cfg = text_config(tiny_bert_dir, tmp_path, data={"dataset": dataset})
    with pytest.raises(ConfigError, match=r"data\.dataset \(hf_dataset\): hf_dataset\.columns: .*has columns \['lang', 'site', 'utterance'\]; missing columns \(classification needs 'language'\)"):  # fmt: skip
        run_fit(cfg, tmp_path)
    assert not list((tmp_path / "runs").rglob("rounds.csv"))


def test_vision_fit_on_saved_images(tmp_path):
    """A tiny ViT trains one round on PNG images saved with save_to_disk (grey, mixed sizes resized at load)."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (int(rng.integers(8, 20)),) * 2, dtype=np.uint8) for _ in range(40)]
    image_table(imgs, [str(i % 4) for i in range(40)], "picture", "digit").save_to_disk(str(tmp_path / "pics"))
    dataset = {"class_path": "hf_dataset", "init_args": {"path": str(tmp_path / "pics"), "columns": {"image": "picture", "label": "digit"}, "image_size": 16}}  # fmt: skip
    cfg = vision_config(tmp_path, data={"dataset": dataset}, federation={"rounds": 1})
    fed = round_callback(run_fit(cfg, tmp_path))
    assert fed.history[-1]["round"] == 1 and np.isfinite(fed.history[-1]["val_loss"])


def test_shipped_example_table_matches_its_generator():
    """configs/data/chatterbot_sites.parquet is what configs/data/make_chatterbot_sites.py writes."""
    import importlib.util

    root = Path(__file__).parent.parent / "configs" / "data"
    spec = importlib.util.spec_from_file_location("make_sites", root / "make_chatterbot_sites.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = pa.parquet.read_table(str(root / "chatterbot_sites.parquet")).to_pydict()
    assert shipped == module.rows()
    assert len(set(shipped["site"])) >= 10


def test_an_unused_empty_split_does_not_stop_the_run(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"text": [], "label": []}, features=features)
    full = datasets.Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in BASE], features=features)
    datasets.DatasetDict({"train": full, "validation": full.select([0, 1]), "test": empty}).save_to_disk(
        str(tmp_path / "d")
    )
    splits = hf(tmp_path / "d", tmp_path).load()
    assert len(splits.train) == len(BASE) and [e["text"] for e in splits.val] == ["t0", "t1"]
    with pytest.raises(ValueError, match=r"hf_dataset: split 'test' of .* is empty"):
        hf(tmp_path / "d", tmp_path, val_split="test").load()
