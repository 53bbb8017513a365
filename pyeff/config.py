"""Configuration dataclasses: one base for every config pyeff has (training, each method's
conversion), so that they validate, serialise into checkpoints and turn into command-line options
the same way.

    @dataclass
    class MyConfig(Config):
        width: int = 4
        def validate(self): ...; return self

    cfg = MyConfig(width=8)             # validated on construction
    cfg.replace(width=16)               # a validated copy
    MyConfig.from_dict(cfg.to_dict())   # round trip through a checkpoint (unknown keys: an error)
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any


class Config:
    """Base of pyeff's config dataclasses (subclasses are @dataclass and define `validate`)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> "Config":
        """Raise ValueError/TypeError naming the bad field and what is expected; return self."""
        return self

    @classmethod
    def _what(cls) -> str:
        return cls.__name__

    def to_dict(self) -> dict:
        """Plain values (tuples as lists), for JSON and checkpoints loaded with weights_only."""
        def plain(v: Any):
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (tuple, list)):
                return [plain(i) for i in v]
            return v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"{cls._what()}.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls._what()} keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def replace(self, **changes):
        """A validated copy with `changes` (field names; an unknown name is an error)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"{self._what()} has no field {', '.join(unknown)} (fields: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **changes)


# -- command-line options generated from a Config ---------------------------------------------
#
#     add_config_args(parser, DFSConfig, title="conversion")     # --bits, --train-mode, ...
#     args = parser.parse_args()
#     config = config_from_args(DFSConfig, args)                  # validated, or ValueError
#
# Generated options default to argparse.SUPPRESS: an option the user did not give is absent from
# `args`, so config_from_args can layer dataclass defaults < presets < command line < extra.

_NONE_WORDS = ("none", "null")


def _is_config_class(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Config)


def field_docs(cls) -> dict:
    """Help text per field from the class docstring: a line `name: text` (or `a, b: text` or
    `a / b: text`, which document both) starts a field's paragraph; more-indented lines continue it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict = {}
    for klass in reversed(cls.__mro__):  # a subclass's text wins over its bases'
        if "__doc__" in vars(klass) and issubclass(klass, Config):
            docs.update(_docstring_fields(vars(klass)["__doc__"] or "", names))
    return docs


def _docstring_fields(doc: str, names) -> dict:
    docs: dict = {}
    current: list = []
    indent = None
    for line in doc.splitlines():
        stripped = line.strip()
        m = re.match(r"^([A-Za-z_]\w*(?:\s*[,/]\s*[A-Za-z_]\w*)*)\s*:\s*(.*)$", stripped)
        keys = [k.strip() for k in re.split(r"[,/]", m.group(1))] if m else []
        if keys and all(k in names for k in keys):
            current, indent = keys, len(line) - len(line.lstrip())
            for k in keys:
                docs[k] = m.group(2).strip()
        elif current and stripped and len(line) - len(line.lstrip()) > indent:
            for k in current:
                docs[k] = f"{docs[k]} {stripped}".strip()
        else:
            current = []
    return docs


def _show(v) -> str:
    """A default as the user would type it on the command line."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (tuple, list)):
        return ",".join(_show(i) for i in v) if v else "empty"
    return str(v)


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _scalar_parser(tp):
    names = {int: "an integer", float: "a number", str: "a string"}
    if tp not in names:
        return None

    def parse(text: str):
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {names[tp]}, got {text!r}") from None
    return parse


def _field_parser(tp, name: str):
    """(kind, parse, metavar, choices) for a field annotation; kind is "bool", "value" or "config";
    None for an annotation with no command-line form."""
    inner, optional = _unwrap_optional(tp)
    literal = None
    if inner is bool:
        return "bool", None, None, None
    if _is_config_class(inner) and not optional:
        return "config", None, None, None
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is typing.Literal:
        choices = list(args)
        by_text = {str(c): c for c in choices}

        def parse(text):
            if text not in by_text:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(by_text)}, got {text!r}")
            return by_text[text]
        base, metavar, literal = parse, None, choices
    elif origin is tuple and args:
        variadic = len(args) == 2 and args[1] is Ellipsis
        elem_types = [args[0]] if variadic else list(args)
        elem_parsers = [_scalar_parser(t) for t in elem_types]
        if any(p is None for p in elem_parsers):
            return None
        word = {int: "INT", float: "X", str: "S"}

        def parse(text):
            items = [s.strip() for s in text.split(",")] if text.strip() else []
            if not variadic and len(items) != len(elem_parsers):
                raise argparse.ArgumentTypeError(f"expected {len(elem_parsers)} comma-separated values, got {text!r}")
            try:
                return tuple((elem_parsers[0] if variadic else elem_parsers[i])(s) for i, s in enumerate(items))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated {'integers' if elem_types[0] is int else 'numbers'}, got {text!r}"
                ) from None
        base = parse
        metavar = (word[elem_types[0]] + ",...") if variadic else ",".join(word[t] for t in elem_types)
    else:
        base = _scalar_parser(inner)
        if base is None:
            return None
        metavar = {int: "N", float: "X", str: name.upper()}[inner]
    if not optional:
        return "value", base, metavar, literal

    def parse_optional(text):
        return None if text.strip().lower() in _NONE_WORDS else base(text)
    return "value", parse_optional, metavar, literal


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_config_args(parser, cls, *, exclude=(), help=None, prefix: str = "", flags=None, choices=None,
                    default_text=None, title: str | None = None, description: str | None = None):
    """Add one option per field of the Config dataclass `cls` to `parser`; returns the parser or
    the argument group (when `title` is given) they went into.

    Option names are `--<prefix><field-name>` (underscores as dashes); bools get `--x/--no-x`;
    Optional fields accept `none`; tuples take comma-separated values; Literal[...] fields get
    choices; a nested Config field is flattened into `--<field>-<subfield>` options. The help text
    of a field comes from `help` (plain text, a % is literal) or the class docstring (see
    `field_docs`), followed by `(default: <the dataclass default>)`.

    Args:
        exclude: field names to leave out (e.g. ones the caller derives).
        help: {field: text} replacing the docstring's text; `"<field>.<subfield>"` for nested ones.
        flags: {field: ["--a", "--b"]} option strings replacing the generated one (aliases).
        choices: {field: values} to list in the help and enforce at parsing.
        default_text: {field: text} shown as the default instead of the dataclass's value (over
            the class attribute `cli_default_text`, where a config states what None means).
        title, description: put the options into an argument group.
    """
    exclude, help, flags = set(exclude), dict(help or {}), dict(flags or {})
    choices = dict(choices or {})
    default_text = {**getattr(cls, "cli_default_text", {}), **(default_text or {})}
    known = {f.name for f in dataclasses.fields(cls)}
    for name, given in (("exclude", exclude), ("help", {k.split(".")[0] for k in help}), ("flags", flags),
                        ("choices", choices), ("default_text", default_text)):
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"add_config_args({cls.__name__}): {name} names no field {', '.join(unknown)}")
    target = parser.add_argument_group(title, description) if title else parser
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        option = f"--{prefix}{f.name}".replace("_", "-")
        dest = _dest(prefix, f.name)
        parsed = _field_parser(hints[f.name], f.name)
        if parsed is None:
            raise TypeError(f"add_config_args({cls.__name__}): field {f.name!r} of type {hints[f.name]!r} has no "
                            "command-line form; exclude it")
        kind, parse, metavar, literal = parsed
        default = _field_default(f)
        if kind == "config":
            sub_cls = _unwrap_optional(hints[f.name])[0]
            sub_help = {k.split(".", 1)[1]: v for k, v in help.items() if k.startswith(f.name + ".")}
            # the parent's default instance may differ from the nested class's own defaults
            shown = {g.name: _show(getattr(default, g.name)) for g in dataclasses.fields(sub_cls)
                     if isinstance(default, sub_cls)}
            add_config_args(target, sub_cls, help=sub_help, default_text=shown,
                            prefix=f"{prefix}{f.name}_".replace("_", "-"))
            continue
        text = help.get(f.name, docs.get(f.name, ""))
        shown = default_text.get(f.name, _show(default))
        text = _escape(f"{text} (default: {shown})".strip())
        opts = flags.get(f.name, [option])
        if kind == "bool":
            target.add_argument(*opts, dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
            continue
        kw = dict(dest=dest, type=parse, default=argparse.SUPPRESS, help=text)
        if f.name in choices or literal:
            kw["choices"] = list(choices.get(f.name, literal))
        elif metavar:
            kw["metavar"] = metavar
        target.add_argument(*opts, **kw)
    return target


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def args_given(cls, args, *, prefix: str = "") -> dict:
    """{field: value} of the options generated by add_config_args that the command line gave
    (nested Config fields as dicts of their given subfields)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        dest = _dest(prefix, f.name)
        inner, optional = _unwrap_optional(hints[f.name])
        if _is_config_class(inner) and not optional:
            sub = args_given(inner, args, prefix=f"{prefix}{f.name}_")
            if sub:
                out[f.name] = sub
        elif hasattr(args, dest):
            out[f.name] = getattr(args, dest)
    return out


def config_from_args(cls, args, *, prefix: str = "", presets=None, **extra):
    """Build and validate a `cls` from options added by add_config_args: the dataclass defaults,
    then `presets` (e.g. a --quick preset), then what the command line gave, then `extra` (values
    the caller derives). A value the config rejects raises ValueError (pyeff's CLI prints it and
    exits with 2)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((set(presets or {}) | set(extra)) - known)
    if unknown:
        raise TypeError(f"config_from_args({cls.__name__}): no field {', '.join(unknown)}")
    values = dict(presets or {})
    hints = typing.get_type_hints(cls)
    for name, v in args_given(cls, args, prefix=prefix).items():
        inner, _ = _unwrap_optional(hints[name])
        if _is_config_class(inner):  # the given subfields over the preset's (or the default's)
            base = values.get(name)
            base = base.to_dict() if isinstance(base, Config) else dict(base or {})
            v = _build(inner, {**base, **v})
        values[name] = v
    values.update(extra)
    return _build(cls, values)


def _build(cls, values: dict):
    try:
        return cls(**values)
    except TypeError as exc:  # a value of the wrong kind: the user's input, not a bug
        raise ValueError(str(exc)) from None
