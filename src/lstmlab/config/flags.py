"""``lstmlab train``'s flags, built from the schema: one flag per declared setting (its type, choices, help and
the default recipe's value, with the seed recipe's where it differs), plus the flags that are not settings
(recipe, output, data folder, threads). Every config flag defaults to None, meaning "as the recipe says".
Torch-free, so that ``lstmlab train --help`` answers without loading torch."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import replace
from typing import Any

from lstmlab.config.recipes import RECIPES, recipe
from lstmlab.config.schema import DRY_RUN_ITERATIONS, Config, Setting, settings

GROUPS = ("data", "model", "optimisation")


def whole_number(text: str) -> int:
    """argparse type of the whole-number flags: a one-line error for "1.5" or "ten"."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _reads(value: Any) -> str:
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default_text(section: str, f: dataclasses.Field, s: Setting, default: Config, seed: Config) -> str:
    """"(default: X)", or "(default: X; --recipe seed: Y)" when the textbook's recipe differs."""
    def shown(config: Config) -> str:
        obj = getattr(config, section)
        return s.shown(obj) if s.shown else _reads(getattr(obj, f.name))

    mine, theirs = shown(default), shown(seed)
    return f"(default: {mine}; --recipe seed: {theirs})" if mine != theirs else f"(default: {mine})"


def _add_setting(group: argparse._ArgumentGroup, section: str, f: dataclasses.Field, s: Setting, default: Config,
                 seed: Config) -> None:
    text = f"{s.help} {_default_text(section, f, s, default, seed)}".replace("%", "%%")
    kw: dict[str, Any] = {"dest": f.name, "help": text}
    if isinstance(f.default, bool):
        group.add_argument(s.flag, action="store_true", default=None, **kw)
        return
    if s.choices is not None:
        kw["choices"] = s.choices
    elif s.parse is not None:
        kw["type"] = s.parse
    else:
        kw["type"] = whole_number if "int" in str(f.type) and "float" not in str(f.type) else float
    if s.metavar:
        kw["metavar"] = s.metavar
    group.add_argument(s.flag, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lstmlab train``."""
    g = parser.add_argument_group("recipe and output")
    summaries = ", ".join(f"{name} ({r.summary})" for name, r in RECIPES.items())
    g.add_argument("--recipe", choices=tuple(RECIPES),
                   help=f"preset to start from; any flag below overrides it: {summaries} (default: default)"
                   .replace("%", "%%"))
    g.add_argument("--out", metavar="DIR",
                   help="output folder; must be new or empty (default: runs/<dataset>-<view>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="clear the run already in --out and start a new one")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint, with its saved config (default: a new run)")
    g.add_argument("--dry-run", action="store_true",
                   help=f"{DRY_RUN_ITERATIONS} iterations (or --iterations) on small subsets, end to end, to check "
                   "the set-up; keeps nothing unless --out is given")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the test accuracy")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars and per-gate histograms to OUT/tensorboard "
                   "(pip install 'lstmlab[tensorboard]')")
    default, seed = Config(), recipe("seed")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for section, f, s in settings():
        if s.flag is not None:
            _add_setting(groups[s.group], section, f, s, default, seed)
    groups["data"].add_argument("--data-dir", metavar="DIR",
                                help="folder holding the four IDX files (default: $LSTMLAB_DATA, then the cache, "
                                "downloading)")
    groups["optimisation"].add_argument(
        "--threads", type=whole_number, metavar="N",
        help="torch threads of this process (default: torch's choice; under torchrun, the machine's cores shared out "
        "among its processes unless OMP_NUM_THREADS is set to other than torchrun's 1)")


def given_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings the command line gave, by section."""
    given: dict[str, dict[str, Any]] = {}
    for section, f, s in settings():
        value = getattr(args, f.name, None)
        if s.flag is not None and value is not None:
            given.setdefault(section, {})[f.name] = value
    return given


def flag_of(section: str, name: str) -> str:
    """The flag of the setting ``section``.``name``."""
    return next(s.flag for sec, f, s in settings() if sec == section and f.name == name)


def implied_recipe(args: argparse.Namespace) -> str:
    """The recipe a run without --recipe starts from: the view's (pixels, permuted) or the dataset's."""
    view = getattr(args, "view", None)
    if view in ("pixels", "permuted"):
        return view
    return "fashion" if getattr(args, "dataset", None) == "fashion-mnist" else "default"


def config_from_args(args: argparse.Namespace) -> Config:
    """The recipe, with every flag the user gave laid over it."""
    name = getattr(args, "recipe", None) or implied_recipe(args)
    config = recipe(name)
    given = given_settings(args)
    for section, values in given.items():
        setattr(config, section, replace(getattr(config, section), **values))
    if "epochs" in given.get("train", {}) and "iterations" not in given.get("train", {}):
        config.train.iterations = None  # an explicit --epochs replaces the recipe's iteration count
    if given:
        config.recipe = f"{name}+flags"
    return config
