"""Your data in the formats you already have: Hugging Face ``datasets`` saved with ``save_to_disk``, or local
parquet / JSON Lines / CSV / Arrow files read through ``datasets.load_dataset`` (never from the Hub)."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedlight.data.base import Dataset, DatasetSplits, split_train_val
from fedlight.data.files import _label_sort_key
from fedlight.hookspecs import hookimpl

#: what each kind of example needs, in detection order (fedlight field names)
SCHEMAS: dict[str, tuple[str, ...]] = {
    "image": ("image", "label"),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
    "generation": ("prompt", "response"),
}
FIELDS = ("text", "label", "prompt", "response", "chosen", "rejected", "image")
#: ``load_dataset`` builder per file suffix
SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
}
#: split names tried, in order, for validation when ``val_split`` is not set
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev", "test")
Format = Literal["auto", "disk", "parquet", "json", "csv", "arrow"]


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def resolve_local_files(path: str, field: str) -> list[str]:
    """The local files ``path`` names (one file or a glob), or a ValueError saying why it is not local data."""
    expanded = str(Path(path).expanduser())
    if _is_glob(expanded):
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"hf_dataset.{field}: the pattern {path!r} matches no local files")
        return matches
    if Path(expanded).is_file():
        return [expanded]
    if Path(expanded).is_dir():
        raise ValueError(
            f"hf_dataset.{field}: {path!r} is a folder but not a save_to_disk output (no dataset_info.json + "
            f"state.json or dataset_dict.json); point {field} at its files instead, e.g. '{path.rstrip('/')}/*.parquet'"
        )
    raise FileNotFoundError(
        f"hf_dataset.{field}: {path!r} is not a local file or folder. hf_dataset reads local data only, never the "
        f"Hugging Face Hub: where you are online run `datasets.load_dataset({path!r}).save_to_disk('DIR')` and set "
        f"{field}: DIR (or give a parquet/jsonl/csv/arrow file)"
    )


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` folder."""
    return ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()) or (
        path / "dataset_dict.json"
    ).is_file()


def file_format(files: Sequence[str], field: str) -> str:
    """The ``load_dataset`` builder for ``files`` from their suffixes (all must agree)."""
    formats = set()
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix not in SUFFIX_FORMATS:
            raise ValueError(
                f"hf_dataset.{field}: unsupported file type {Path(f).name!r}; supported suffixes: "
                f"{', '.join(sorted(SUFFIX_FORMATS))} (or set hf_dataset.format: parquet, json, csv or arrow)"
            )
        formats.add(SUFFIX_FORMATS[suffix])
    if len(formats) > 1:
        raise ValueError(f"hf_dataset.{field}: files of mixed formats {sorted(formats)}; give one format per path")
    return formats.pop()


def _has_rows(path: str, builder: str) -> bool:
    """False for an empty file, or a parquet file whose footer counts 0 rows (``load_dataset`` fails obscurely)."""
    if Path(path).stat().st_size == 0:
        return False
    if builder == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except (pa.ArrowException, OSError):  # not parquet: load_dataset reports it
            return True
    return True


def to_image_tensor(value: Any) -> torch.Tensor:
    """A PIL image or an array (HxW, HxWxC or CxHxW; uint8 in [0, 255] or float in [0, 1]) as a float CxHxW tensor.

    This is the layout :class:`fedlight.tasks.image_classification.ImageClassification` collates (as
    ``fashion_mnist`` gives it): grey images keep one channel, which the task repeats to ``in_chans``.
    """
    from PIL import Image  # pillow comes with torchvision, a core dependency

    if isinstance(value, Image.Image):
        if value.mode not in ("L", "RGB"):
            value = value.convert("L" if value.mode in ("1", "I", "I;16", "F") else "RGB")
        value = np.asarray(value)
    array = np.asarray(value)
    if array.dtype == object or array.size == 0:
        raise ValueError(f"an image must be a PIL image or a numeric array, got {type(value).__name__}")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
            array = np.moveaxis(array, -1, 0)
        if array.shape[0] == 4:
            array = array[:3]  # drop alpha
        if array.shape[0] not in (1, 3):
            raise ValueError(f"an image array must have 1 or 3 channels, got shape {tuple(np.asarray(value).shape)}")
    else:
        raise ValueError(f"an image array must be HxW, HxWxC or CxHxW, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        scaled = array.astype(np.float32) / (1.0 if array.dtype == np.bool_ else 255.0)
    else:
        scaled = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled))


class HFDataset(Dataset):
    """Your data as Hugging Face datasets: a save_to_disk folder or local parquet/JSONL/CSV/Arrow files.

    ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
    ``datasets.load_from_disk``), or a local file or glob (``data/*.parquet``) read with
    ``datasets.load_dataset("parquet" | "json" | "csv" | "arrow", data_files=...)``; ``val_path``
    optionally names separate validation files. A name that is not a local path is refused: this
    plugin never contacts the Hub.

    Splits: ``train_split`` (default ``train``) trains; ``val_split`` validates, by default the first
    of ``validation``, ``valid``, ``val``, ``dev``, ``test`` present, else a seeded ``val_fraction`` of
    the training split. ``columns`` maps fedlight's fields to your column names (e.g.
    ``{text: review, label: stars}``); unmapped fields use their own names. The example kind follows
    from the columns present: ``image,label`` (vision), ``text,label`` (classification),
    ``prompt,chosen,rejected`` (preferences, the ``dpo`` task) or ``prompt,response`` (causal LM).
    Labels may be ints or strings: a ``ClassLabel`` keeps its names, anything else becomes sorted
    label names (numbers numerically). ``group`` names a natural client id column (user, site) for
    the ``natural_id`` partitioner (default: a column called ``group`` if there is one);
    ``metadata`` lists columns kept in every example for the ``metadata`` partitioner. Images (PIL or
    arrays) become float CxHxW tensors in [0, 1]; ``image_size`` resizes them at load.
    """

    name = "hf_dataset"

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        format: Format = "auto",
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        columns: dict[str, str] | None = None,
        group: str | None = None,
        metadata: list[str] | None = None,
        max_train: int | None = None,
        max_val: int | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if format not in ("auto", "disk", "parquet", "json", "csv", "arrow"):
            raise ValueError(f"hf_dataset.format must be auto, disk, parquet, json, csv or arrow, got {format!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"hf_dataset.val_fraction must be in (0, 1), got {val_fraction}")
        unknown = sorted(set(columns or {}) - set(FIELDS))
        if unknown:
            raise ValueError(
                f"hf_dataset.columns: unknown fields {unknown}; map any of {list(FIELDS)} to your column names"
            )
        for field, value in (("max_train", max_train), ("max_val", max_val), ("image_size", image_size)):
            if value is not None and value < 1:
                raise ValueError(f"hf_dataset.{field} must be >= 1 or null, got {value}")
        clashes = sorted(set(metadata or []) & set(FIELDS))
        if clashes:
            raise ValueError(f"hf_dataset.metadata: {clashes} are fedlight's own example fields; list other columns")
        if val_path is not None and format == "disk":
            raise ValueError(
                "hf_dataset.val_path is for data files; a save_to_disk folder names its splits (val_split)"
            )
        if val_split is not None and val_split == train_split:
            raise ValueError(
                f"hf_dataset.val_split and train_split are both {train_split!r}; pick two different splits"
            )
        self.path, self.val_path, self.format = path, val_path, format
        self.train_split, self.val_split, self.val_fraction, self.seed = train_split, val_split, val_fraction, seed
        self.columns = dict(columns or {})
        self.group, self.metadata = group, list(metadata or [])
        self.max_train, self.max_val, self.image_size, self.cache_dir = max_train, max_val, image_size, cache_dir

    # -- reading --------------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The splits as ``datasets.Dataset`` objects, by split name (local reads only)."""
        try:
            import datasets
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "hf_dataset needs the Hugging Face 'datasets' package: pip install datasets"
            ) from None

        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            return self._read(datasets)
        finally:
            if was_enabled:
                datasets.enable_progress_bars()

    def _read(self, datasets) -> dict[str, Any]:
        root = Path(self.path).expanduser()
        if self.format == "disk" or (self.format == "auto" and root.is_dir() and is_saved_dataset(root)):
            if not (root.is_dir() and is_saved_dataset(root)):
                raise FileNotFoundError(
                    f"hf_dataset.path: {self.path!r} is not a save_to_disk folder (no dataset_info.json + state.json "
                    "or dataset_dict.json)"
                )
            if self.val_path is not None:
                raise ValueError(
                    f"hf_dataset.val_path: {self.path!r} is a save_to_disk folder, which names its own splits; "
                    "drop val_path and pick one with val_split"
                )
            if not (root / "dataset_dict.json").is_file():
                return {self.train_split: datasets.load_from_disk(str(root))}
            # split by split: datasets cannot load a DatasetDict holding an empty split (IndexError), and an
            # empty split the run does not use should not stop it
            names = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            out: dict[str, Any] = {}
            for name in names:
                state = json.loads((root / name / "state.json").read_text(encoding="utf-8"))
                out[name] = datasets.Dataset.load_from_disk(str(root / name)) if state.get("_data_files") else ()
            return out
        data_files = {self.train_split: resolve_local_files(self.path, "path")}
        if self.val_path is not None:
            data_files[self.val_split or "validation"] = resolve_local_files(self.val_path, "val_path")
        builder: str = self.format
        if builder == "auto":
            builder = file_format([f for fs in data_files.values() for f in fs], "path")
        kwargs: dict[str, Any] = {}
        if builder == "csv" and all(Path(f).suffix.lower() == ".tsv" for fs in data_files.values() for f in fs):
            kwargs["sep"] = "\t"
        for split, files in data_files.items():
            if not any(_has_rows(f, builder) for f in files):
                raise ValueError(f"hf_dataset: split {split!r} of {self.path!r} is empty (its files hold no rows)")
        import pyarrow as pa

        try:
            loaded = datasets.load_dataset(builder, data_files=data_files, cache_dir=self.cache_dir, **kwargs)
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError, IndexError) as err:
            cause = err.__cause__ or err
            raise ValueError(
                f"hf_dataset.path: cannot read {self.path!r} as {builder} ({type(cause).__name__}: {cause}); "
                "check the file or set hf_dataset.format"
            ) from None
        return dict(loaded)

    def pick_splits(self, splits: dict[str, Any]) -> tuple[Any, Any | None]:
        """(train, validation or None when it is to be split off the training split)."""
        where = f"{self.path!r}"
        if self.train_split not in splits:
            raise ValueError(
                f"hf_dataset.train_split: {where} has no split {self.train_split!r}; available: {sorted(splits)}"
            )
        train = splits[self.train_split]
        if self.val_split is not None:
            if self.val_split not in splits:
                raise ValueError(
                    f"hf_dataset.val_split: {where} has no split {self.val_split!r}; available: {sorted(splits)}"
                )
            val = splits[self.val_split]
        else:
            name = next((n for n in VAL_SPLIT_NAMES if n in splits and n != self.train_split), None)
            val = splits[name] if name is not None else None
        for split_name, ds in ((self.train_split, train), (self.val_split or "validation", val)):
            if ds is not None and len(ds) == 0:
                raise ValueError(f"hf_dataset: split {split_name!r} of {where} is empty")
        return train, val

    # -- columns --------------------------------------------------------------------------------------
    def column(self, field: str) -> str:
        return self.columns.get(field, field)

    def detect_schema(self, available: Iterable[str]) -> str:
        """The example kind whose (mapped) columns are all present, else a ValueError listing the columns."""
        available = set(available)
        mapped = set(self.columns)
        for schema, fields in SCHEMAS.items():
            if mapped <= set(fields) and all(self.column(f) in available for f in fields):
                return schema
        wanted = [s for s, fs in SCHEMAS.items() if mapped and mapped <= set(fs)] or list(SCHEMAS)
        missing = {s: [self.column(f) for f in SCHEMAS[s] if self.column(f) not in available] for s in wanted}
        options = "; ".join(f"{s} needs {', '.join(repr(c) for c in cols)}" for s, cols in missing.items())
        raise ValueError(
            f"hf_dataset.columns: {self.path!r} has columns {sorted(available)}; missing columns ({options}). "
            "Map fedlight's fields to your columns, e.g. columns: {text: review, label: stars}"
        )

    def check_columns(self, ds: Any, split: str, needed: list[str]) -> None:
        available = list(ds.column_names)
        for option, col in [("columns", c) for c in needed] + [("metadata", c) for c in self.metadata]:
            if col not in available:
                raise ValueError(
                    f"hf_dataset.{option}: split {split!r} of {self.path!r} has no column {col!r}; "
                    f"available: {sorted(available)}"
                )

    def group_column(self, available: Sequence[str]) -> str | None:
        if self.group is not None:
            if self.group not in available:
                raise ValueError(
                    f"hf_dataset.group: split {self.train_split!r} of {self.path!r} has no column {self.group!r}; "
                    f"available: {sorted(available)}"
                )
            return self.group
        return "group" if "group" in available else None

    # -- conversion -----------------------------------------------------------------------------------
    def _subset(self, n: int, limit: int | None, salt: int) -> np.ndarray:
        if limit is None or limit >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng([self.seed, salt]).permutation(n)[:limit])

    @staticmethod
    def label_values(ds: Any, col: str) -> list[Any]:
        """The labels of one split, with a ``ClassLabel``'s ints as their names (-1, "no label", as None)."""
        from datasets import ClassLabel

        feature = ds.features[col]
        values = list(ds[col])
        if isinstance(feature, ClassLabel):
            return [feature.int2str(v) if isinstance(v, int) and v >= 0 else None for v in values]
        return values

    def label_names(self, train: Any, val: Any, col: str) -> tuple[list[str], list[Any], list[Any]]:
        """Label names (a ``ClassLabel``'s own, else sorted: numbers numerically) and each split's labels."""
        from datasets import ClassLabel

        values = {"train": self.label_values(train, col), "val": self.label_values(val, col)}
        for split, vals in values.items():
            bad = next((i for i, v in enumerate(vals) if v is None or isinstance(v, float | list | dict)
                        or str(v).strip() == ""), None)  # fmt: skip
            if bad is not None:
                v = vals[bad]
                what = "no label" if v is None or str(v).strip() == "" else f"the {type(v).__name__} label {v!r}"
                name = self.train_split if split == "train" else self.val_split or "validation"
                raise ValueError(
                    f"hf_dataset.columns.label: split {name!r} row {bad + 1} has {what} in column {col!r}; labels "
                    "must be ints or non-empty strings (classification), not floats or lists"
                )
        features = [train.features[col], val.features[col]]
        if all(isinstance(f, ClassLabel) for f in features) and features[0].names == features[1].names:
            names = list(features[0].names)
        else:
            names = sorted({str(v) for vals in values.values() for v in vals}, key=_label_sort_key)
        ids = {name: i for i, name in enumerate(names)}
        return names, [ids[str(v)] for v in values["train"]], [ids[str(v)] for v in values["val"]]

    def convert(self, ds: Any, schema: str, split: str, labels: list[int] | None) -> list[dict]:
        fields = [f for f in SCHEMAS[schema] if f != "label"]
        cols = [self.column(f) for f in fields]
        rows = ds.select_columns(list(dict.fromkeys(cols + self.metadata)))
        out: list[dict[str, Any]] = []
        for i, row in enumerate(rows, 1):
            example: dict[str, Any] = {}
            for field, col in zip(fields, cols):
                value = row[col]
                if field == "image":
                    if value is None:
                        raise ValueError(f"hf_dataset: split {split!r} row {i} has no image in column {col!r}")
                    try:
                        example["image"] = self.resize(to_image_tensor(value))
                    except ValueError as err:
                        raise ValueError(f"hf_dataset: split {split!r} row {i}, column {col!r}: {err}") from None
                else:
                    if value is None or (field in ("text", "prompt") and str(value).strip() == ""):
                        raise ValueError(f"hf_dataset: split {split!r} row {i} has no value in column {col!r}")
                    example[field] = str(value)
            if labels is not None:
                example["label"] = labels[i - 1]
            for col in self.metadata:
                if row[col] is None or str(row[col]) == "":
                    raise ValueError(f"hf_dataset: split {split!r} row {i} has no value in metadata column {col!r}")
                example[col] = str(row[col])
            out.append(example)
        return out

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        if self.image_size is None or image.shape[-2:] == (self.image_size, self.image_size):
            return image
        size = (self.image_size, self.image_size)
        resized = torch.nn.functional.interpolate(
            image[None], size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return resized[0].clamp(0.0, 1.0)

    def check_images(self, examples: list[dict]) -> None:
        """All images in one shape (the task stacks them); grey ones are repeated when others are RGB."""
        channels = {ex["image"].shape[0] for ex in examples}
        if channels == {1, 3}:
            for ex in examples:
                ex["image"] = ex["image"].expand(3, -1, -1).contiguous()
        sizes = {tuple(ex["image"].shape[-2:]) for ex in examples}
        if len(sizes) > 1:
            raise ValueError(
                f"hf_dataset: images come in {len(sizes)} sizes (e.g. {sorted(sizes)[:3]}); set "
                "hf_dataset.image_size to resize them all at load"
            )

    def load(self) -> DatasetSplits:
        train, val = self.pick_splits(self.read())
        schema = self.detect_schema(train.column_names)
        needed = [self.column(f) for f in SCHEMAS[schema]]
        self.check_columns(train, self.train_split, needed)
        group_col = self.group_column(train.column_names)
        if val is None:
            if len(train) < 2:
                raise ValueError(
                    f"hf_dataset: split {self.train_split!r} of {self.path!r} has {len(train)} row; it needs >= 2 to "
                    "split off validation (or give a validation split / val_path)"
                )
            train_idx, val_idx = split_train_val(len(train), self.val_fraction, self.seed)
            train, val = train.select(train_idx), train.select(val_idx)
        else:
            self.check_columns(val, self.val_split or "validation", needed)
        train = train.select(self._subset(len(train), self.max_train, 0))
        val = val.select(self._subset(len(val), self.max_val, 1))

        label_names: list[str] = []
        train_labels = val_labels = None
        if "label" in SCHEMAS[schema]:
            label_names, train_labels, val_labels = self.label_names(train, val, self.column("label"))
        train_examples = self.convert(train, schema, self.train_split, train_labels)
        val_examples = self.convert(val, schema, self.val_split or "validation", val_labels)
        if schema == "image":
            self.check_images(train_examples + val_examples)

        groups = None
        if group_col is not None:
            values = list(train[group_col])
            missing = [i for i, g in enumerate(values, 1) if g is None or str(g) == ""]
            if missing:
                raise ValueError(
                    f"hf_dataset.group: column {group_col!r} is empty in {len(missing)} training rows (e.g. row {missing[0]})"
                )
            groups = [str(g) for g in values]
        return DatasetSplits(train=train_examples, val=val_examples, label_names=label_names, groups=groups)


@hookimpl
def fedlight_datasets() -> list[type]:
    return [HFDataset]
