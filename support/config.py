"""
Settings: one record per run, built from the command line over a preset, and presets themselves.

A script's settings are a dataclass whose fields are its flags (`flag(default, help)`; the field `batch_size`
is the flag `--batch-size`): `parse(Settings, argv)` builds the record, `Settings(...)` builds one in code, as
the studies do, and `dataclasses.asdict` saves it beside what the run made.

A preset is a small JSON file configs/NAME.json with a section per command ("tokenizer-train",
"tokenizer-encode", "train", "sample", "evaluate", "toy"), each a map of flag names to values:
`--config NAME` (or the path of such a file) sets those flags' defaults, and a flag given on the command line
still wins. A flag a preset sets is no longer required on the command line.
"""

import argparse
import dataclasses
import json
import os

from support.cli import ArgumentParser, UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def flag(default, help, **argparse_kw):
    """A settings field and the command-line flag that sets it. argparse_kw: choices, type, required, ..."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kw))


def add_flags(parser, settings_class):
    """One flag per field of a settings dataclass: a bool is a switch with its opposite, so that the command line
    can undo a preset's (--compile and --no-compile; --no-flip and --flip); the others take a value of their
    default's type unless the field says otherwise."""
    for field in dataclasses.fields(settings_class):
        kw = dict(field.metadata)
        name = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            opposite = "--" + name[5:] if name.startswith("--no-") else "--no-" + name[2:]
            parser.add_argument(name, action="store_true", default=field.default, **kw)
            parser.add_argument(opposite, dest=field.name, action="store_false", default=field.default,
                                help=f"undo {name} (where a preset sets it)")
            continue
        if "type" not in kw and field.default is not None and not isinstance(field.default, str):
            kw["type"] = type(field.default)
        parser.add_argument(name, default=field.default, **kw)
    return parser


def preset_names():
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".json"))


def load_preset(name, section):
    """The flag values of `section` in the preset `name` (a file in configs/, or a path); {} where it has none."""
    path = name if name.endswith(".json") else os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise UserError(f"--config {name}: no such preset (expected {path}; presets: {', '.join(preset_names())})")
    try:
        with open(path) as f:
            preset = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable preset ({e}); expected a JSON object of sections") from None
    values = preset.get(section, {}) if isinstance(preset, dict) else None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of sections, each a map of flag names to values")
    return values


def add_config_flag(parser):
    parser.add_argument("--config", metavar="NAME", help=f"a preset in configs/ ({', '.join(preset_names())}) or "
                        f"the path of one; flags given here override it")


def apply_preset(parser, argv, section):
    """The defaults of `parser` from `--config NAME`'s section, where argv gives one."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    values = load_preset(known.config, section)
    actions = {a.dest: a for a in parser._actions}
    unknown = [key for key in values if key not in actions or key == "config"]
    if unknown:
        raise UserError(f"--config {known.config}: '{unknown[0]}' is not a setting of this command (section "
                        f"'{section}')")
    for key in values:
        actions[key].required = False
    parser.set_defaults(**values)


def parse_args(parser, argv, section):
    """parser.parse_args(argv) over the defaults of `--config NAME`'s section, if given."""
    add_config_flag(parser)
    apply_preset(parser, argv, section)
    return parser.parse_args(argv)


def parse(settings_class, argv, section, description):
    """A settings record from the command line (over a preset): settings_class(**flags)."""
    parser = add_flags(ArgumentParser(description=description), settings_class)
    args = vars(parse_args(parser, argv, section))
    args.pop("config")
    return settings_class(**args)


def command_line(settings):
    """The flags that give a settings record from its class's defaults: what to type to repeat a run."""
    words = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value == field.default:
            continue
        name = "--" + field.name.replace("_", "-")
        words += [name] if value is True else [name, str(value)]
    return " ".join(words)
