"""tinylm's own checkpoint format for any GPTConfig: config.json holds every GPTConfig field and
a format_version, so an ssm model saves, resumes, samples and describes itself from the CLI;
`tinylm export-hf` writes a Hugging Face GPT-2 directory (attention models only), and Hugging
Face directories still load."""
import json
import os
from dataclasses import fields

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.train.checkpoint import FORMAT_VERSION, latest_checkpoint, load_model, save_weights
from tinylm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf_tiny")
SSM = ["--mixer", "ssm", "--d-state", "4", "--d-conv", "3", "--expand", "3", "--n-layer", "2", "--d-model", "8",
       "--n-ctx", "16", "--batch-size", "2", "--warmup", "1", "--eval-every", "3", "--eval-batches", "1",
       "--checkpoint-every", "3", "--steps", "8", "--quiet"]


def test_gpt_config_from_dict_round_trips_and_names_the_bad_key():
    config = GPTConfig(vocab_size=7, n_ctx=5, n_layer=1, n_head=1, d_model=4, mixer="ssm", d_state=3)
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, message in [({**config.to_dict(), "n_ctx": 5.0}, "key 'n_ctx' must be int, got 5.0"),
                         ({**config.to_dict(), "mixer": 3}, "key 'mixer' must be str"),
                         ({**config.to_dict(), "n_layer": True}, "key 'n_layer' must be int, got True"),
                         ({**config.to_dict(), "n_head": 3}, "d_model=4 must be divisible by n_head=3"),
                         ({k: v for k, v in config.to_dict().items() if k != "expand"}, "missing key 'expand'"),
                         ([1, 2], "must be a JSON object, got list")]:
        with pytest.raises(ValueError, match=f"config.*{message[:20]}"):
            GPTConfig.from_dict(bad)


def test_ssm_pretrain_resume_sample_info_from_the_cli(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("def f(x):\n    return x * 2\n" * 30)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(["pretrain", "--out", straight, "--data", str(tmp_path / "data.txt"), *SSM]) == 0
    assert main(["pretrain", "--out", split, "--data", str(tmp_path / "data.txt"), *SSM, "--stop-at", "4"]) == 0
    assert main(["pretrain", "--out", split, "--resume", "--quiet"]) == 0
    capsys.readouterr()
    saved = json.load(open(os.path.join(latest_checkpoint(split), "config.json")))
    assert saved == {"format_version": FORMAT_VERSION, **load_model(split)[0].config.to_dict()}
    assert set(saved) == {"format_version"} | {f.name for f in fields(GPTConfig)}
    assert saved["mixer"] == "ssm" and saved["expand"] == 3
    a, b = load_model(straight)[0], load_model(split)[0]
    for k in a.params:                                            # resumed bit for bit
        assert a.params[k].tobytes() == b.params[k].tobytes(), k
    assert main(["sample", split, "--prompt", "def", "--max-new-tokens", "30", "--seed", "2"]) == 0
    cached = capsys.readouterr()
    assert cached.out.startswith("def") and "mixer=ssm" in cached.err
    assert main(["sample", split, "--prompt", "def", "--max-new-tokens", "30", "--seed", "2", "--no-cache"]) == 0
    assert capsys.readouterr().out == cached.out                 # the fixed-size state gives the same text
    assert main(["info", split]) == 0
    out = capsys.readouterr().out
    assert "mixer=ssm d_state=4 d_conv=3 expand=3" in out and "step: 8 of 8" in out and "data.txt" in out
    assert main(["export-hf", split, str(tmp_path / "hf")]) == 2
    assert "only attention models export" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_export_hf_writes_what_from_pretrained_reads(tmp_path, capsys):
    model = GPT(GPTConfig(vocab_size=257, n_ctx=8, n_layer=1, n_head=2, d_model=8), seed=3)
    run = tmp_path / "run"
    run.mkdir()
    save_weights(str(run), model.config, model.numpy_params())    # a bare checkpoint directory
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    hf = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf["model_type"] == "gpt2" and "format_version" not in hf
    idx = np.arange(8)[None]
    np.testing.assert_array_equal(GPT.from_pretrained(tmp_path / "hf").forward(idx), model.forward(idx))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_hugging_face_directories_still_load():
    """`tinylm rlhf` and `sample` read LM directories written by save_pretrained / transformers."""
    model, ckpt_dir, state = load_model(FIXTURE)
    assert state is None and ckpt_dir == FIXTURE and model.config.mixer == "attention"
