"""The settings declared once (lstmlab.config.schema): defaults are the default recipe, recipes are data, the flags
and the checks come from the declarations, and the torch-free names agree with the registries they stand for."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from lstmlab.config import Config, validate_config
from lstmlab.config.flags import add_arguments, config_from_args
from lstmlab.config.recipes import RECIPES, recipe
from lstmlab.config.schema import BACKENDS, CELLS, DATASETS, VIEWS, settings
from lstmlab.errors import LstmlabError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lstmlab train")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_defaults_are_the_default_recipe_and_every_recipe_is_valid() -> None:
    assert Config() == recipe("default")
    for name in RECIPES:
        config = recipe(name)
        validate_config(config)
        assert config.recipe == name
    assert recipe("fashion").model.zoneout is not recipe("fashion").model.zoneout  # a fresh copy every time
    seed = recipe("seed")
    assert (seed.train.optimizer, seed.train.lr, seed.train.batch_size, seed.train.iterations, seed.train.clip,
            seed.data.normalize, seed.data.augment_shift) == ("sgd", 0.1, 100, 6000, None, "seed", 0)


def test_the_torch_free_names_match_their_registries() -> None:
    from lstmlab.data import DATASETS as DATA_DATASETS
    from lstmlab.data import VIEWS as DATA_VIEWS
    from lstmlab.nn.cell import CELLS as NN_CELLS
    from lstmlab.nn.lstm import BACKENDS as NN_BACKENDS

    assert (DATASETS, VIEWS, BACKENDS, CELLS) == (tuple(DATA_DATASETS), tuple(DATA_VIEWS), NN_BACKENDS, NN_CELLS)


def test_every_flagged_setting_is_a_flag_showing_its_default() -> None:
    parser = argparse.ArgumentParser(prog="lstmlab train")
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for _, f, s in settings():
        if s.flag is None:
            continue
        assert actions[f.name].option_strings == [s.flag]
        assert "(default: " in actions[f.name].help
    assert "(default: 0.004; --recipe seed: 0.1)" in actions["lr"].help
    assert "(default: 10; --recipe seed: 6000 iterations)" in actions["epochs"].help


def test_flags_lay_over_the_recipe() -> None:
    config = config_from_args(_parse("--hidden-size", "64", "--layers", "2", "--zoneout", "0.1,0.05", "--epochs", "3"))
    assert (config.model.hidden_size, config.model.num_layers, config.model.zoneout) == (64, 2, [0.1, 0.05])
    assert (config.train.epochs, config.train.iterations, config.recipe) == (3.0, None, "default+flags")
    assert config_from_args(_parse("--view", "pixels")).model.cell == "layernorm"  # the view's recipe
    assert config_from_args(_parse("--recipe", "seed", "--epochs", "1")).train.iterations is None
    assert config_from_args(_parse()).recipe == "default"


@pytest.mark.parametrize(("section", "name", "value", "words"), [
    ("model", "dropout", 1.0, "--dropout must be in [0, 1), got 1.0"),
    ("model", "hidden_size", "2", "--hidden-size must be in 1..4096, got '2'"),
    ("model", "bidirectional", 1, "--bidirectional must be true or false"),
    ("data", "augment_shift", 9, "--augment-shift must be in 0..8 pixels, got 9"),
    ("train", "lr", float("nan"), "--lr must be in (0, 1e+06], got nan"),
    ("train", "clip", 0.0, "--clip must be a positive number, got 0.0"),
    ("train", "time_budget", -1.0, "--time-budget must be a positive number of seconds"),
    ("train", "device", "tpu", "--device must be one of auto, cpu, cuda, got 'tpu'"),
    ("train", "world_size", 0, "the config's world_size must be in 1..65536, got 0"),
    ("model", "cell", "gru", "--cell: "),
])
def test_validation_speaks_in_flags(section: str, name: str, value: object, words: str) -> None:
    config = Config()
    setattr(config, section, dataclasses.replace(getattr(config, section), **{name: value}))
    with pytest.raises(LstmlabError) as e:
        validate_config(config)
    assert words in str(e.value)


def test_epochs_count_only_without_iterations() -> None:
    config = recipe("seed")  # epochs 0, iterations 6000
    validate_config(config)
    config.train.iterations = None
    with pytest.raises(LstmlabError, match="--epochs"):
        validate_config(config)


def test_the_flags_load_no_torch() -> None:
    code = ("import sys, argparse; from lstmlab.config.flags import add_arguments; "
            "add_arguments(argparse.ArgumentParser()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
