from conftest import round_callback, run_fit, text_config, vision_config


def test_text_fit_runs(tiny_bert_dir, tmp_path):
    cli = run_fit(text_config(tiny_bert_dir, tmp_path), tmp_path)
    fed = round_callback(cli)
    assert [r["round"] for r in fed.history] == [0, 1, 2]


def test_vision_fit_runs(tmp_path):
    cli = run_fit(vision_config(tmp_path), tmp_path)
    fed = round_callback(cli)
    assert [r["round"] for r in fed.history] == [0, 1, 2]
