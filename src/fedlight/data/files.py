"""User data from local JSONL or CSV files: classification (text, label), generation (prompt, response) or
preferences (prompt, chosen, rejected)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

from fedlight.data.base import Dataset, DatasetSplits, split_train_val
from fedlight.hookspecs import hookimpl

SCHEMAS = {
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
    "generation": ("prompt", "response"),
}
GROUP_COLUMN = "group"


def read_rows(path: Path, fmt: Literal["auto", "jsonl", "csv"] = "auto", field: str = "path") -> list[dict[str, Any]]:
    """Rows of a JSONL file (one object per line, blank lines skipped) or a CSV file with a header."""
    if not path.is_file():
        raise FileNotFoundError(f"files.{field}: {str(path)!r} does not exist or is not a file")
    if fmt == "auto":
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            fmt = "jsonl"
        elif suffix in (".csv", ".tsv"):
            fmt = "csv"
        else:
            raise ValueError(f"files.{field}: cannot tell the format of {path.name!r}; set files.format: jsonl or csv")
    rows: list[dict[str, Any]] = []
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"files.{field}: {path.name} line {lineno} is not valid JSON: {err}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"files.{field}: {path.name} line {lineno} is not a JSON object")
                rows.append(row)
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(encoding="utf-8", newline="") as f:
            rows = [dict(r) for r in csv.DictReader(f, delimiter=delimiter)]
    if not rows:
        raise ValueError(f"files.{field}: {path.name} has no rows")
    return rows


def detect_schema(rows: list[dict[str, Any]], name: str) -> str:
    columns = set().union(*(r.keys() for r in rows))
    for schema, needed in SCHEMAS.items():
        if set(needed) <= columns:
            return schema
    raise ValueError(
        f"files: {name} has columns {sorted(columns)}; expected 'text' and 'label' (classification) "
        f"or 'prompt' and 'response' (generation) or 'prompt', 'chosen' and 'rejected' (preferences), "
        "plus an optional 'group'"
    )


def _label_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


class Files(Dataset):
    """Your own examples from local JSONL or CSV files (text/label or prompt/response columns).

    ``path`` holds the training rows (or all rows, split by a seeded ``val_fraction``); ``val_path``
    optionally holds the validation rows. Columns ``text,label`` make a classification dataset
    (labels, strings or numbers, are mapped to ids in sorted order: numbers numerically); columns
    ``prompt,response`` make a generation dataset, ``prompt,chosen,rejected`` a preference dataset
    (the ``dpo`` task). An optional ``group`` column is a natural client id (e.g. a user or site) for
    natural-id partitioning. ``metadata`` lists extra columns (e.g. ``[task, source]``) kept in every
    example for the ``metadata`` partitioner. ``format: auto`` goes by the file suffix.
    """

    name = "files"

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_fraction: float = 0.2,
        format: Literal["auto", "jsonl", "csv"] = "auto",
        seed: int = 0,
        metadata: list[str] | None = None,
    ) -> None:
        if val_path is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"files.val_fraction must be in (0, 1), got {val_fraction}")
        if format not in ("auto", "jsonl", "csv"):
            raise ValueError(f"files.format must be 'auto', 'jsonl' or 'csv', got {format!r}")
        self.path = Path(path).expanduser()
        self.val_path = Path(val_path).expanduser() if val_path else None
        self.val_fraction = val_fraction
        self.format = format
        self.seed = seed
        self.metadata = list(metadata or [])

    def _check(self, rows: list[dict[str, Any]], schema: str, name: str) -> None:
        for i, row in enumerate(rows, 1):
            for column in SCHEMAS[schema]:
                value = row.get(column)
                if value is None or (column in ("text", "label", "prompt") and str(value).strip() == ""):
                    raise ValueError(f"files: {name} row {i} has no value in column {column!r}")
            for column in self.metadata:
                if row.get(column) in (None, ""):
                    raise ValueError(f"files: {name} row {i} has no value in metadata column {column!r}")

    def load(self) -> DatasetSplits:
        rows = read_rows(self.path, self.format, "path")
        schema = detect_schema(rows, self.path.name)
        self._check(rows, schema, self.path.name)
        if self.val_path is not None:
            val_rows = read_rows(self.val_path, self.format, "val_path")
            val_schema = detect_schema(val_rows, self.val_path.name)
            if val_schema != schema:
                raise ValueError(f"files: {self.path.name} is {schema} data but {self.val_path.name} is {val_schema}")
            self._check(val_rows, schema, self.val_path.name)
            train_rows = rows
        else:
            if len(rows) < 2:
                raise ValueError(f"files: {self.path.name} needs >= 2 rows to split off validation (or set val_path)")
            train_idx, val_idx = split_train_val(len(rows), self.val_fraction, self.seed)
            train_rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]

        label_names: list[str] = []
        if schema == "classification":
            label_names = sorted({str(r["label"]) for r in train_rows + val_rows}, key=_label_sort_key)
            ids = {name: i for i, name in enumerate(label_names)}

            def convert(r: dict[str, Any]) -> dict[str, Any]:
                return {"text": str(r["text"]), "label": ids[str(r["label"])]}
        else:
            columns = SCHEMAS[schema]

            def convert(r: dict[str, Any]) -> dict[str, Any]:
                return {c: str(r[c]) for c in columns}

        def example(r: dict[str, Any]) -> dict[str, Any]:
            return {**convert(r), **{c: str(r[c]) for c in self.metadata}}

        groups = None
        if any(GROUP_COLUMN in r for r in train_rows):
            missing = [i for i, r in enumerate(train_rows, 1) if r.get(GROUP_COLUMN) in (None, "")]
            if missing:
                raise ValueError(
                    f"files: the 'group' column is empty in {len(missing)} training rows (e.g. row {missing[0]})"
                )
            groups = [str(r[GROUP_COLUMN]) for r in train_rows]
        return DatasetSplits(
            train=[example(r) for r in train_rows],
            val=[example(r) for r in val_rows],
            label_names=label_names,
            groups=groups,
        )


@hookimpl
def fedlight_datasets() -> list[type]:
    return [Files]
