"""One energy account for the whole package: unit costs per operation (`EnergyModel`) and a
per-phase tally of what a run executed (`EnergyAccount`).

    from pyeff.energy import EnergyModel, EnergyAccount

    em = EnergyModel()                  # 45 nm figures (Horowitz, ISSCC 2014)
    em.mac_pj_at("fp32"), em.mac_pj_at(8), em.mac_pj_at((4, 16))    # 4.6, 0.23, ... pJ

    acct = EnergyAccount(em)
    acct.add_macs("forward", 1.2e9, "int8")
    acct.add_accesses("forward", act=3e6, weight=2.7e5, bits=8)
    with acct.timed("forward"):
        ...                              # measured wall-clock seconds go to "forward"
    acct.energy_j(), acct.table()       # joules; one row per phase plus a "total" row

Arithmetic ("precision") names: "fp32" and "fp16" (floating point, the two widths the source
tabulates), and integers: an int `n` or "int<n>" for an n-bit x n-bit MAC, a pair `(a, b)` or
"int<a>x<b>" for an a-bit x b-bit one (e.g. a 4-bit activation times a 16-bit gradient).

Sources and rules (all at 45 nm, Horowitz, "Computing's energy problem", ISSCC 2014, Fig. 1.1.9):
    int8  add 0.03 pJ, mult 0.2 pJ          int32 add 0.1 pJ, mult 3.1 pJ
    fp16  add 0.4 pJ,  mult 1.1 pJ          fp32  add 0.9 pJ, mult 3.7 pJ
    a MAC = one multiply + one add at the operand width (fp32: 4.6 pJ, int8: 0.23 pJ);
    8 KB SRAM, 64-bit word: ~10 pJ, taken as ~5 pJ per 32-bit word read or written.
Integer widths other than 8 and 32 are interpolated (1..32 bits):
    multiply(a, b) = M0 + M2 * a * b   (an array multiplier has a*b partial-product cells, so the
                                        energy is ~quadratic in the width)
    add(a, b)      = A0 + A1 * max(a, b)   (a ripple/prefix adder grows ~linearly with its width;
                                        the accumulator is as wide as the wider operand, the
                                        same convention as the source's n-bit MAC = n-bit
                                        mult + n-bit add)
with M0, M2, A0, A1 the unique values through the 8- and 32-bit figures, so both are reproduced
exactly (int16: 0.78 + 0.053 = 0.833 pJ). Memory accesses scale linearly with the bits moved
(`act_pj`/`weight_pj` are per 32-bit word; an 8-bit access costs a quarter).
`EnergyModel.mac_pj` is the float32 MAC; every other width keeps its 45 nm ratio to it, so setting
mac_pj for another technology node rescales the whole MAC table at once.
"""
from __future__ import annotations

import math
import numbers
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

from pyeff.config import Config

# Horowitz ISSCC 2014, 45 nm, pJ per operation
INT_ADD_PJ = {8: 0.03, 32: 0.1}
INT_MULT_PJ = {8: 0.2, 32: 3.1}
FP_ADD_PJ = {16: 0.4, 32: 0.9}
FP_MULT_PJ = {16: 1.1, 32: 3.7}
FP32_MAC_PJ = 4.6  # FP_MULT_PJ[32] + FP_ADD_PJ[32], written out: 3.7 + 0.9 is 4.6000000000000005 in binary

# the interpolation through the 8- and 32-bit integer points (see the module docstring)
_M2 = (INT_MULT_PJ[32] - INT_MULT_PJ[8]) / (32 ** 2 - 8 ** 2)
_M0 = INT_MULT_PJ[8] - _M2 * 8 ** 2
_A1 = (INT_ADD_PJ[32] - INT_ADD_PJ[8]) / (32 - 8)
_A0 = INT_ADD_PJ[8] - _A1 * 8

MAX_BITS = 32
TOTAL = "total"  # the name of the table's sum row, so no phase may take it
_PRECISION_FORMS = ("'fp32', 'fp16', an int n (1..32) or 'int<n>' for an n-bit integer MAC, "
                    "a pair (a, b) or 'int<a>x<b>' for an a-bit x b-bit one")


def _int_mac_45nm(a: int, b: int) -> float:
    return _M0 + _M2 * a * b + _A0 + _A1 * max(a, b)


def _check_bits(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"pyeff.energy: {what} must be an integer number of bits in 1..{MAX_BITS}, "
                         f"got {v!r}")
    if not 1 <= v <= MAX_BITS:
        raise ValueError(f"pyeff.energy: {what} must be in 1..{MAX_BITS} bits, got {v}")
    return int(v)


def parse_precision(spec) -> tuple:
    """('fp', bits, bits) or ('int', a, b) with a <= b, from any accepted spelling; ValueError
    naming the accepted forms otherwise."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("fp32", "float32", "float"):
            return ("fp", 32, 32)
        if s in ("fp16", "float16", "half"):
            return ("fp", 16, 16)
        m = re.fullmatch(r"int(\d+)(?:x(\d+))?", s)
        if not m:
            raise ValueError(f"pyeff.energy: unknown arithmetic {spec!r}; the unit costs cover "
                             f"{_PRECISION_FORMS} (no bf16 or fp8 figures in the 45 nm source)")
        a = _check_bits(int(m.group(1)), "integer width")
        b = _check_bits(int(m.group(2)), "integer width") if m.group(2) else a
        return ("int", min(a, b), max(a, b))
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"pyeff.energy: a mixed-width MAC is a pair (a_bits, b_bits), got {spec!r}")
        a, b = (_check_bits(v, "integer width") for v in spec)
        return ("int", min(a, b), max(a, b))
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        a = _check_bits(spec, "bits")
        return ("int", a, a)
    raise ValueError(f"pyeff.energy: unknown arithmetic {spec!r}; expected {_PRECISION_FORMS}")


def precision_label(spec) -> str:
    """The canonical name of an arithmetic: 'fp32', 'fp16', 'int8', 'int4x16'."""
    kind, a, b = parse_precision(spec)
    if kind == "fp":
        return f"fp{a}"
    return f"int{a}" if a == b else f"int{a}x{b}"


@dataclass
class EnergyModel(Config):
    """Energy per operation in pJ. Defaults: 45 nm figures (Horowitz, ISSCC 2014): a float32
    multiply (3.7 pJ) plus add (0.9 pJ) per MAC, and a 32-bit word of an 8 KB SRAM (~5 pJ) per
    activation read or written and per weight read (weights are assumed to stream from on-chip
    SRAM once per sample). Pass your accelerator's numbers for its tables. Other arithmetic:
    `mac_pj_at` (the rules are in pyeff.energy's docstring).

    mac_pj: energy of one float32 multiply-accumulate, pJ.
    act_pj: energy of reading or writing one activation (a 32-bit word), pJ.
    weight_pj: energy of reading one weight (a 32-bit word), pJ.
    """
    mac_pj: float = FP32_MAC_PJ
    act_pj: float = 5.0
    weight_pj: float = 5.0

    def validate(self) -> "EnergyModel":
        for name in ("mac_pj", "act_pj", "weight_pj"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
                raise ValueError(f"pyeff.energy: EnergyModel.{name} must be a number of pJ >= 0, got {v!r}")
        return self

    def mac_pj_at(self, bits="fp32") -> float:
        """pJ of one MAC in the arithmetic `bits`: 'fp32' (= mac_pj), 'fp16', an int width n
        (1..32, or 'int<n>') or a pair (a, b) of integer widths. Integer widths between and
        around the tabulated 8 and 32 follow the quadratic-multiplier, linear-adder rule; all
        widths scale with mac_pj / 4.6 (their 45 nm ratio to the float32 MAC)."""
        kind, a, b = parse_precision(bits)
        if kind == "fp":
            if a == 32:
                return float(self.mac_pj)
            return (FP_MULT_PJ[a] + FP_ADD_PJ[a]) * self.mac_pj / FP32_MAC_PJ
        return _int_mac_45nm(a, b) * self.mac_pj / FP32_MAC_PJ

    def access_pj(self, kind: str, bits: int = 32) -> float:
        """pJ of one activation ('act') or weight ('weight') access of `bits` bits (linear in bits)."""
        if kind not in ("act", "weight"):
            raise ValueError(f"pyeff.energy: access kind must be 'act' or 'weight', got {kind!r}")
        return getattr(self, f"{kind}_pj") * _check_bits(bits, "access width") / 32


def _count(v, what: str):
    """A non-negative finite count or duration (int kept exact); 0-d tensors and numpy scalars ok."""
    if not isinstance(v, numbers.Real) and hasattr(v, "item"):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            raise ValueError(f"pyeff.energy: {what} must be one number, got an array") from None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
        raise ValueError(f"pyeff.energy: {what} must be a finite number >= 0, got {v!r}")
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def _new_phase() -> dict:
    # access counts and the bits they moved (the energy is linear in bits, so bits is what prices)
    return {"macs": {}, "act": 0, "act_bits": 0, "weight": 0, "weight_bits": 0, "seconds": 0.0}


class EnergyAccount:
    """Per-phase tally of a run: MACs by arithmetic, activation and weight accesses, measured
    seconds; energy estimates from an EnergyModel's unit costs.

    Phases are free names ("forward", "backward", "predictor", ...) created on first use, kept in
    that order; "total" is reserved for the table's sum row. The state is plain containers
    (`state_dict` / `load_state_dict`), so an account can ride in a training checkpoint.
    """

    def __init__(self, model: EnergyModel | None = None):
        if model is None:
            model = EnergyModel()
        if not isinstance(model, EnergyModel):
            raise TypeError(f"pyeff.energy: EnergyAccount needs an EnergyModel, got {type(model).__name__}")
        self.model = model
        self._phases: dict[str, dict] = {}

    # -- recording ------------------------------------------------------------------------
    def _phase(self, phase) -> dict:
        if not isinstance(phase, str) or not phase.strip():
            raise ValueError(f"pyeff.energy: a phase is a non-empty name such as 'forward', got {phase!r}")
        if phase == TOTAL:
            raise ValueError(f"pyeff.energy: {TOTAL!r} is the name of the table's sum row; "
                             "give the phase another name")
        return self._phases.setdefault(phase, _new_phase())

    def add_macs(self, phase: str, count, bits="fp32") -> "EnergyAccount":
        """Record `count` MACs executed in arithmetic `bits` (see EnergyModel.mac_pj_at)."""
        label = precision_label(bits)
        n = _count(count, "a MAC count")
        macs = self._phase(phase)["macs"]
        macs[label] = macs.get(label, 0) + n
        return self

    def add_accesses(self, phase: str, act=0, weight=0, bits: int = 32) -> "EnergyAccount":
        """Record activation reads/writes and weight reads of `bits` bits each."""
        act, weight = _count(act, "an activation access count"), _count(weight, "a weight access count")
        bits = _check_bits(bits, "access width")
        p = self._phase(phase)
        p["act"] += act
        p["act_bits"] += act * bits
        p["weight"] += weight
        p["weight_bits"] += weight * bits
        return self

    def add_seconds(self, phase: str, seconds) -> "EnergyAccount":
        self._phase(phase)["seconds"] += float(_count(seconds, "seconds"))
        return self

    @contextmanager
    def timed(self, phase: str, sync=None):
        """Add the wall-clock time of the `with` body to `phase`. On a GPU pass
        `sync=torch.cuda.synchronize`, so queued kernels are inside the measurement."""
        self._phase(phase)
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            if sync is not None:
                sync()
            self.add_seconds(phase, time.perf_counter() - t0)

    def merge(self, other: "EnergyAccount") -> "EnergyAccount":
        """Add another account's counts (e.g. another rank's) into this one, phase by phase."""
        if not isinstance(other, EnergyAccount):
            raise TypeError(f"pyeff.energy: can only merge an EnergyAccount, got {type(other).__name__}")
        if other.model != self.model:
            raise ValueError(f"pyeff.energy: cannot merge accounts priced by different energy models "
                             f"({self.model} vs {other.model})")
        for name, q in other._phases.items():
            p = self._phase(name)
            for k in ("act", "act_bits", "weight", "weight_bits", "seconds"):
                p[k] += q[k]
            for label, n in q["macs"].items():
                p["macs"][label] = p["macs"].get(label, 0) + n
        return self

    # -- reading ----------------------------------------------------------------------------
    @property
    def phases(self) -> list:
        return list(self._phases)

    def _select(self, phase) -> list:
        if phase is None:
            return list(self._phases.values())
        if phase not in self._phases:
            known = ", ".join(repr(p) for p in self._phases) or "none yet"
            raise ValueError(f"pyeff.energy: no phase {phase!r} in this account (phases: {known})")
        return [self._phases[phase]]

    def macs(self, phase: str | None = None) -> dict:
        """{arithmetic label: MACs} of one phase, or summed over all."""
        out: dict = {}
        for p in self._select(phase):
            for label, n in p["macs"].items():
                out[label] = out.get(label, 0) + n
        return out

    def seconds(self, phase: str | None = None) -> float:
        return sum(p["seconds"] for p in self._select(phase))

    def _energy_pj(self, p: dict) -> dict:
        em = self.model
        mac = sum(n * em.mac_pj_at(label) for label, n in p["macs"].items())
        return {"mac": mac, "act": p["act_bits"] / 32 * em.act_pj,
                "weight": p["weight_bits"] / 32 * em.weight_pj}

    def energy_j(self, phase: str | None = None) -> float:
        """Estimated energy in joules of one phase, or of the whole account."""
        return sum(sum(self._energy_pj(p).values()) for p in self._select(phase)) * 1e-12

    def table(self) -> list:
        """One row per phase plus a 'total' row, each with the same keys: phase, seconds,
        macs_<label> for every arithmetic seen, act_accesses, weight_accesses, mac_j, act_j,
        weight_j, energy_j."""
        labels: list = []
        for p in self._phases.values():
            labels += [k for k in p["macs"] if k not in labels]

        def row(name, parts):
            r = {"phase": name, "seconds": sum(p["seconds"] for p in parts)}
            for label in labels:
                r[f"macs_{label}"] = sum(p["macs"].get(label, 0) for p in parts)
            r["act_accesses"] = sum(p["act"] for p in parts)
            r["weight_accesses"] = sum(p["weight"] for p in parts)
            e = [self._energy_pj(p) for p in parts]
            for k in ("mac", "act", "weight"):
                r[f"{k}_j"] = sum(x[k] for x in e) * 1e-12
            r["energy_j"] = r["mac_j"] + r["act_j"] + r["weight_j"]
            return r

        rows = [row(name, [p]) for name, p in self._phases.items()]
        return rows + [row(TOTAL, list(self._phases.values()))]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.to_dict(),
                "phases": {k: {**v, "macs": dict(v["macs"])} for k, v in self._phases.items()}}

    def load_state_dict(self, state: dict) -> None:
        model = EnergyModel.from_dict(state["model"])
        if model != self.model:
            raise ValueError(f"pyeff.energy: the saved account was priced by {model}, this one by "
                             f"{self.model}; use the same EnergyModel")
        self._phases = {}
        for name, p in state["phases"].items():
            q = self._phase(name)
            for label, n in p["macs"].items():
                q["macs"][precision_label(label)] = _count(n, "a MAC count")
            for k in ("act", "act_bits", "weight", "weight_bits", "seconds"):
                q[k] = _count(p[k], k)

    def __repr__(self) -> str:
        return f"EnergyAccount({len(self._phases)} phases, {self.energy_j():.4g} J, {self.seconds():.4g} s)"
