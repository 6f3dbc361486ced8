"""Settings records and presets (support/config.py): --config NAME sets a command's defaults, flags override
them, every preset names only real settings, and a bad preset is one line."""

import json
import shlex

import pytest

import evaluate
import sample
import tokenizer
import train
from conftest import one_line_error
from support import config

TIER2_TRAIN_FLAGS = ["--model", "DiT-T/1", "--objective", "purrception", "--steps", "2500", "--batch-size", "32",
                     "--lr", "4e-3", "--warmup-steps", "100", "--lr-final", "0", "--ema-decay", "0.999",
                     "--ema-warmup", "--time-dist", "logit-normal:0:1", "--ckpt-every", "500", "--sample-every",
                     "1000", "--log-every", "100"]
RUN = ["--codes", "C", "--out", "O"]


def test_the_fmnist_preset_is_the_tier_2_recipe_and_flags_override_it():
    preset = config.parse(train.Settings, RUN + ["--config", "fmnist"], "train", "")
    assert preset == config.parse(train.Settings, RUN + TIER2_TRAIN_FLAGS, "train", "")
    assert preset != config.parse(train.Settings, RUN, "train", "")  # the defaults are another recipe
    overridden = config.parse(train.Settings, RUN + ["--config", "fmnist", "--lr", "1e-3", "--steps", "7"], "train", "")
    assert (overridden.lr, overridden.steps, overridden.batch_size) == (1e-3, 7, 32)
    drawn = sample.parse_args(["--config", "fmnist", "--ckpt", "K", "--out", "O", "--cfg-scale", "2"])
    assert (drawn.cfg_scale, drawn.cfg_interval, drawn.solver, drawn.steps) == (2.0, "0.4:1", "midpoint", 8)
    assert sample.parse_args(["--config", "mnist", "--ckpt", "K", "--out", "O"]).cfg_scale == 1.5


def test_a_switch_a_preset_turns_on_can_be_turned_off():
    xl = config.parse(train.Settings, RUN + ["--config", "in256-xl2"], "train", "")
    assert xl.compile and not config.parse(train.Settings, RUN + ["--config", "in256-xl2", "--no-compile"], "train",
                                           "").compile
    off = config.parse(train.Settings, RUN + ["--config", "fmnist", "--no-ema-warmup"], "train", "")
    assert not off.ema_warmup and off.lr == 4e-3
    assert config.parse(train.Settings, RUN + ["--no-flip", "--flip"], "train", "").no_flip is False  # the last wins
    assert sample.parse_args(["--ckpt", "K", "--out", "O", "--no-ema"]).no_ema


def test_a_preset_sets_flags_that_are_otherwise_required():
    args = tokenizer.parse_args(["train", "--config", "mnist", "--data-dir", "D", "--out", "O"])
    assert (args.dataset, args.steps, args.lr) == ("mnist", 800, 4e-3)
    with pytest.raises(SystemExit):  # without the preset, --dataset is required
        tokenizer.parse_args(["train", "--data-dir", "D", "--out", "O"])
    args = tokenizer.parse_args(["encode", "--config", "in256-xl2", "--tokenizer-ckpt", "W", "--data-dir", "D",
                                 "--out", "O"])
    assert (args.tokenizer, args.dataset, args.image_size) == ("llamagen-vq8", "imagefolder", 256)
    assert evaluate.parse_args(["--config", "fmnist", "--samples", "S", "--data-dir", "D"]).dataset == "fashion-mnist"


@pytest.mark.parametrize("name", config.preset_names())
def test_every_preset_names_only_settings_of_its_commands(name):
    with open(f"{config.CONFIG_DIR}/{name}.json") as f:
        sections = json.load(f)
    parsers = {
        "train": lambda: config.parse(train.Settings, RUN + ["--config", name], "train", ""),
        "sample": lambda: sample.parse_args(["--config", name, "--ckpt", "K", "--out", "O"]),
        "tokenizer-train": lambda: tokenizer.parse_args(["train", "--config", name, "--data-dir", "D", "--out", "O"]),
        "tokenizer-encode": lambda: tokenizer.parse_args(["encode", "--config", name, "--data-dir", "D", "--out", "O"]
                                                         + ([] if "tokenizer" in sections[section] else
                                                            ["--tokenizer", "T"])),
        "evaluate": lambda: evaluate.parse_args(["--config", name, "--samples", "S", "--data-dir", "D"]),
    }
    for section, values in sections.items():
        if section not in parsers:
            assert section == "toy", f"{name}.json: unknown section {section}"
            continue
        parsed = vars(parsers[section]())
        for key, value in values.items():
            assert parsed[key] == value, f"{name}.json [{section}] {key}"


def test_a_settings_record_repeats_from_its_command_line():
    settings = train.Settings(codes="C", out="O", steps=12, lr=3e-3, ema_warmup=True, time_dist="logit-normal:0:1")
    words = shlex.split(config.command_line(settings))
    assert words[:2] == ["--codes", "C"] and "--ema-warmup" in words and "--batch-size" not in words
    assert config.parse(train.Settings, words, "train", "") == settings


@pytest.mark.parametrize("extra,message", [
    (["--config", "nope"], "--config nope: no such preset (expected"),
    (["--config", "{tmp}/bad.json"], "bad.json: not a readable preset"),
    (["--config", "{tmp}/other.json"], "--config {tmp}/other.json: 'num_samples' is not a setting of this command"),
])
def test_a_bad_preset_is_one_line(capsys, tmp_path, extra, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"train": {"num_samples": 3}}))
    extra = [e.format(tmp=tmp_path) for e in extra]
    line = one_line_error(capsys, train.main, RUN + extra)
    assert message.format(tmp=tmp_path) in line
