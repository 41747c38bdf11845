"""Evaluation suites: benchmarks on local JSONL files, run on the global model (a plugin kind)."""
