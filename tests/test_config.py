"""Command-line options generated from pyeff's Config dataclasses (pyeff.config.add_config_args /
config_from_args): one option per field, the dataclass default in every help line, types from the
annotations, nested configs flattened, presets under the command line, bad values as ValueError."""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

import pytest

from pyeff.config import Config, add_config_args, config_from_args, field_docs


@dataclass
class Inner(Config):
    """inner.

    scale: a scale factor.
    """
    scale: float = 1.5
    name: str = "x"


@dataclass
class Sample(Config):
    """A config with one field of each kind.

    count: how many (an int),
        continued on a second line.
    ratio / flag: a float and a switch.
    """
    count: int = 3
    ratio: float = 0.25
    flag: bool = True
    label: Optional[str] = None
    sizes: Tuple[int, ...] = (1, 2)
    pair: Tuple[float, float] = (0.0, 2.0)
    maybe_sizes: Optional[Tuple[float, ...]] = None
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=lambda: Inner(scale=4.0))

    def validate(self):
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if not isinstance(self.label, (str, type(None))):
            raise TypeError(f"label must be a string, got {self.label!r}")
        return self


def parser_for(cls, **kw):
    p = argparse.ArgumentParser(prog="t")
    add_config_args(p, cls, **kw)
    return p


def help_text(p):
    return " ".join(p.format_help().split())


def test_docstring_fields():
    docs = field_docs(Sample)
    assert docs["count"] == "how many (an int), continued on a second line."
    assert docs["ratio"] == docs["flag"] == "a float and a switch."
    assert "sizes" not in docs


def test_types_and_round_trip():
    p = parser_for(Sample)
    a = p.parse_args(["--count", "7", "--ratio", "1e-3", "--no-flag", "--label", "hi", "--sizes", "4,5,6",
                      "--pair=-1,3", "--maybe-sizes", "0.5", "--mode", "b", "--inner-scale", "2"])
    c = config_from_args(Sample, a)
    assert c == Sample(count=7, ratio=1e-3, flag=False, label="hi", sizes=(4, 5, 6), pair=(-1.0, 3.0),
                       maybe_sizes=(0.5,), mode="b", inner=Inner(scale=2.0))
    # nothing given: the dataclass defaults (the nested default instance included)
    assert config_from_args(Sample, p.parse_args([])) == Sample()
    assert config_from_args(Sample, p.parse_args(["--label", "none", "--sizes", ""])).sizes == ()


def option_help(p) -> dict:
    """{option string: help as printed} of a parser's actions."""
    return {o: (a.help or "").replace("%%", "%") for a in p._actions for o in a.option_strings}


def test_help_states_every_default():
    p = parser_for(Sample)
    helps = option_help(p)
    for opt, default in (("--count", "3"), ("--ratio", "0.25"), ("--flag", "on"), ("--no-flag", "on"),
                         ("--label", "none"), ("--sizes", "1,2"), ("--pair", "0.0,2.0"), ("--maybe-sizes", "none"),
                         ("--mode", "a"), ("--inner-scale", "4.0"), ("--inner-name", "x")):
        assert helps[opt].endswith(f"(default: {default})"), (opt, helps[opt])
    assert helps["--count"] == "how many (an int), continued on a second line. (default: 3)"
    text = help_text(p)
    assert "(default: 4.0)" in text and "{a,b}" in text


@pytest.mark.parametrize("argv", [["--count", "x"], ["--pair", "1"], ["--sizes", "1,a"], ["--mode", "c"]])
def test_unparsable_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser_for(Sample).parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_invalid_values_are_value_errors():
    p = parser_for(Sample)
    with pytest.raises(ValueError, match="count must be >= 0"):
        config_from_args(Sample, p.parse_args(["--count", "-1"]))
    with pytest.raises(ValueError, match="label must be a string"):  # a TypeError of validate, as ValueError
        config_from_args(Sample, argparse.Namespace(), label=3)


def test_precedence_defaults_presets_command_line_extra():
    p = parser_for(Sample)
    a = p.parse_args(["--count", "9", "--inner-name", "given"])
    c = config_from_args(Sample, a, presets={"count": 5, "ratio": 0.5, "inner": Inner(scale=8.0)}, flag=False)
    assert (c.count, c.ratio, c.flag) == (9, 0.5, False)
    assert c.inner == Inner(scale=8.0, name="given")  # the given subfield over the preset's instance
    with pytest.raises(TypeError, match="no field nosuch"):
        config_from_args(Sample, a, nosuch=1)


def test_exclude_flags_prefix_help_choices_default_text():
    p = parser_for(Sample, exclude=("inner", "pair"), flags={"count": ["--n", "--count"]}, prefix="s-",
                   help={"ratio": "what 50% means"}, choices={"label": ["u", "v"]},
                   default_text={"sizes": "all of them"})
    text = help_text(p)
    assert "--inner-scale" not in text and "--s-pair" not in text and "--s-inner" not in text
    assert "what 50% means (default: 0.25)" in text and "(default: all of them)" in text
    a = p.parse_args(["--n", "4", "--s-ratio", "2", "--s-label", "v", "--no-s-flag"])
    c = config_from_args(Sample, a, prefix="s-")
    assert (c.count, c.ratio, c.label, c.flag) == (4, 2.0, "v", False)
    with pytest.raises(SystemExit):
        p.parse_args(["--s-label", "w"])
    with pytest.raises(TypeError, match="names no field"):
        parser_for(Sample, exclude=("nosuch",))


def test_unsupported_field_type_must_be_excluded():
    @dataclass
    class Odd(Config):
        mapping: dict = dataclasses.field(default_factory=dict)
        n: int = 1

    with pytest.raises(TypeError, match="mapping"):
        parser_for(Odd)
    assert config_from_args(Odd, parser_for(Odd, exclude=("mapping",)).parse_args(["--n", "2"])).n == 2


def _classes():
    from pyeff.ddi.config import DDIConfig
    from pyeff.ddi.recipe import DDIRecipe
    from pyeff.dfs.config import DFSConfig
    from pyeff.dfs.recipe import DFSRecipe
    from pyeff.train import TrainConfig
    return [TrainConfig, DFSConfig, DDIConfig, DFSRecipe, DDIRecipe]


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_pyeff_configs_generate_options_with_defaults(cls):
    """Every field of pyeff's configs becomes an option (a nested config one per subfield) whose
    help states the default. (That each also has text is checked on the commands, tests/test_cli.py,
    which add text where a config's docstring has none.)"""
    p = parser_for(cls)
    assert config_from_args(cls, p.parse_args([])) == cls()
    helps = {a.dest: a.help for a in p._actions if a.dest != "help"}
    for f in dataclasses.fields(cls):
        keys = [k for k in helps if k == f.name or k.startswith(f.name + "_") and f.name == "energy"]
        assert keys, f.name
        for k in keys:
            assert "(default: " in helps[k], k


def test_train_config_round_trip_and_names():
    from pyeff.train import TrainConfig

    c = TrainConfig(milestones=[3, 6], epochs=8, schedule="step")
    assert c.milestones == (3, 6) and TrainConfig.from_dict(c.to_dict()) == c
    assert c.replace(epochs=9).epochs == 9
    with pytest.raises(ValueError, match="unknown training config keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown model 'nosuch'"):
        TrainConfig(model="nosuch")
    with pytest.raises(ValueError, match="unknown dataset 'nosuch'"):
        c.replace(dataset="nosuch")
    assert TrainConfig(model="torchvision.resnet18").model == "torchvision.resnet18"
