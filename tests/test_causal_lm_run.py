"""A federated causal-LM run on a tiny GPT-2: perplexity falls, exact match and ROUGE-L rise over rounds."""

from __future__ import annotations

import json

from conftest import round_callback, run_fit, text_config

COLOURS = "red green blue yellow black white orange purple".split()


def test_federated_causal_lm_learns_and_writes_samples(tiny_gpt2_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(160):
            c = COLOURS[i % len(COLOURS)]
            f.write(json.dumps({"prompt": f"name a {c} thing.", "response": f"a {c} cat is {c}."}) + "\n")
    task = {
        "class_path": "causal_lm",
        "init_args": {"model_name_or_path": str(tiny_gpt2_dir), "max_length": 32, "max_new_tokens": 16,
                      "generate_max_examples": 16},
    }  # fmt: skip
    cfg = text_config(
        tiny_gpt2_dir, tmp_path,
        model={"task": task, "peft": {"class_path": "full"}, "lr": 0.01},
        data={"dataset": {"class_path": "files", "init_args": {"path": str(data), "val_fraction": 0.2}},
              "partitioner": "iid", "batch_size": 16},
        federation={"rounds": 4, "clients_per_round": 2, "local_steps": 10},
    )  # fmt: skip
    history = round_callback(run_fit(cfg, tmp_path)).history
    ppl = [r["val_perplexity"] for r in history]
    em = [r["val_exact_match"] for r in history]
    rouge = [r["val_rougeL"] for r in history]
    assert ppl[-1] < ppl[0] / 10, ppl
    assert em[0] == 0.0 and em[-1] > 0.5, em
    assert rouge[-1] > rouge[0] + 0.4, rouge
    samples = [json.loads(line) for line in next(tmp_path.rglob("samples.jsonl")).read_text().splitlines()]
    assert {s["round"] for s in samples} == {0, 1, 2, 3, 4}
    assert all({"prompt", "generation", "reference"} <= set(s) for s in samples)
