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

import dataclasses
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
