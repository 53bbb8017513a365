"""pyeff.energy: the shared unit-cost table (DDI's defaults, one class under both names), MAC
energy by operand width (the tabulated 45 nm figures and the interpolation rule), the per-phase
account on a hand-computed example, its checkpoint round trip, and every bad input."""
import io
import math

import pytest
import torch

import pyeff.ddi
import pyeff.ddi.config
import pyeff.energy
from pyeff.energy import EnergyAccount, EnergyModel, precision_label


# -- the table -------------------------------------------------------------------------------
def test_defaults_are_ddis_and_one_class():
    assert pyeff.ddi.EnergyModel is pyeff.energy.EnergyModel is pyeff.ddi.config.EnergyModel
    em = EnergyModel()
    assert (em.mac_pj, em.act_pj, em.weight_pj) == (4.6, 5.0, 5.0)  # exactly DDI's old literals
    # an old DDI config (the dict a DDI checkpoint holds) still loads
    cfg = pyeff.ddi.DDIConfig.from_dict({**pyeff.ddi.DDIConfig().to_dict(),
                                         "energy": {"mac_pj": 1.0, "act_pj": 2.0, "weight_pj": 3.0}})
    assert cfg.energy == EnergyModel(1.0, 2.0, 3.0) and isinstance(cfg.energy, EnergyModel)


def test_tabulated_widths():
    em = EnergyModel()
    # Horowitz ISSCC 2014, 45 nm: MAC = mult + add
    assert em.mac_pj_at("fp32") == em.mac_pj_at() == 4.6
    assert em.mac_pj_at("fp16") == pytest.approx(1.1 + 0.4)
    assert em.mac_pj_at(8) == pytest.approx(0.2 + 0.03)
    assert em.mac_pj_at(32) == pytest.approx(3.1 + 0.1)
    assert em.mac_pj_at("int8") == em.mac_pj_at(8) == em.mac_pj_at((8, 8))


def test_interpolation_rule():
    em = EnergyModel()
    m2, a1 = (3.1 - 0.2) / (32 ** 2 - 8 ** 2), (0.1 - 0.03) / (32 - 8)
    # int16 by hand: mult 0.2 + m2 (256 - 64) = 0.78, add 0.03 + a1 * 8 = 0.0533...
    assert em.mac_pj_at(16) == pytest.approx(0.78 + 0.03 + 0.07 / 3)
    # quadratic multiplier + linear adder: constant second difference 2 * m2 across all widths
    e = [em.mac_pj_at(n) for n in range(1, 33)]
    second = [e[i + 1] - 2 * e[i] + e[i - 1] for i in range(1, 31)]
    assert second == pytest.approx([2 * m2] * 30)
    assert all(x < y for x, y in zip(e, e[1:])) and e[0] > 0
    # mixed widths: the multiplier costs a*b cells, the adder is as wide as the wider operand
    assert em.mac_pj_at((4, 16)) == pytest.approx(0.2 + 0.03 + a1 * 8)  # 4*16 = 8*8
    assert em.mac_pj_at((16, 4)) == em.mac_pj_at("int4x16") == em.mac_pj_at("int16x4")
    assert precision_label((16, 4)) == "int4x16" and precision_label(7) == "int7"
    # mac_pj rescales every width by its 45 nm ratio to the float32 MAC
    em2 = EnergyModel(mac_pj=9.2)
    for b in ("fp16", 3, 8, 16, 32, (4, 16)):
        assert em2.mac_pj_at(b) == pytest.approx(2 * em.mac_pj_at(b))
    assert em.access_pj("act", 8) == pytest.approx(1.25) and em.access_pj("weight") == 5.0


# -- the account -----------------------------------------------------------------------------
def _example():
    acct = EnergyAccount()
    acct.add_macs("forward", 1000, "fp32")            # 1000 * 4.6      = 4600 pJ
    acct.add_macs("forward", 2000, 8)                 # 2000 * 0.23     =  460 pJ
    acct.add_accesses("forward", act=100, weight=50)  # 150 * 5         =  750 pJ
    acct.add_accesses("backward", act=64, bits=8)     # 64 * 5 * 8/32   =   80 pJ
    acct.add_macs("backward", 30, (4, 16))            # 30 * (0.2 + 0.03 + 0.07/3) = 7.6 pJ
    acct.add_seconds("forward", 0.5).add_seconds("backward", torch.tensor(0.25))
    return acct


def test_account_totals_by_hand():
    acct = _example()
    assert acct.phases == ["forward", "backward"]
    assert acct.energy_j("forward") == pytest.approx(5810e-12)
    assert acct.energy_j("backward") == pytest.approx(87.6e-12)
    assert acct.energy_j() == pytest.approx(5897.6e-12)
    assert acct.seconds() == 0.75 and acct.seconds("backward") == 0.25
    assert acct.macs() == {"fp32": 1000, "int8": 2000, "int4x16": 30}
    rows = acct.table()
    assert [r["phase"] for r in rows] == ["forward", "backward", "total"]
    assert all(list(r) == list(rows[0]) for r in rows)  # one set of columns: a rectangular table
    fwd, bwd, tot = rows
    assert fwd["macs_int8"] == 2000 and bwd["macs_int8"] == 0 and tot["macs_int4x16"] == 30
    assert fwd["mac_j"] == pytest.approx(5060e-12) and fwd["act_j"] == pytest.approx(500e-12)
    assert fwd["weight_j"] == pytest.approx(250e-12) and bwd["act_j"] == pytest.approx(80e-12)
    assert tot["energy_j"] == pytest.approx(acct.energy_j()) and tot["act_accesses"] == 164
    assert tot["seconds"] == 0.75


def test_account_merge_state_and_timing():
    acct = _example().merge(_example())
    assert acct.energy_j() == pytest.approx(2 * 5897.6e-12) and acct.macs("forward")["fp32"] == 2000
    buf = io.BytesIO()
    torch.save(acct.state_dict(), buf)
    buf.seek(0)
    back = EnergyAccount()
    back.load_state_dict(torch.load(buf, weights_only=True))  # plain containers only
    assert back.table() == acct.table()
    calls = []
    with back.timed("forward", sync=lambda: calls.append(1)):
        pass
    assert len(calls) == 2 and back.seconds("forward") >= acct.seconds("forward")
    assert EnergyAccount().table() == [{"phase": "total", "seconds": 0, "act_accesses": 0,
                                        "weight_accesses": 0, "mac_j": 0.0, "act_j": 0.0,
                                        "weight_j": 0.0, "energy_j": 0.0}]


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, words", [
    (0, "1..32"), (33, "1..32"), (-8, "1..32"), ("int0", "1..32"), ("int64", "1..32"),
    ("int4x40", "1..32"), (8.0, "unknown arithmetic"), (True, "unknown arithmetic"),
    ("bf16", "unknown arithmetic 'bf16'"), ("fp8", "unknown arithmetic"), ("int", "unknown"),
    ((4,), "pair"), ((4, 8, 16), "pair"), ((4, 0), "1..32"), (None, "unknown arithmetic"),
])
def test_bad_bits(bits, words):
    with pytest.raises(ValueError, match=words):
        EnergyModel().mac_pj_at(bits)
    with pytest.raises(ValueError, match=words):
        EnergyAccount().add_macs("forward", 1, bits)


@pytest.mark.parametrize("field", ["mac_pj", "act_pj", "weight_pj"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "5"])
def test_bad_energy_model(field, value):
    with pytest.raises(ValueError, match=f"EnergyModel.{field} must be a number of pJ >= 0"):
        EnergyModel(**{field: value})


def test_bad_account_input():
    acct = _example()
    for bad in (-1, float("nan"), float("inf"), True, "3", torch.ones(3)):
        with pytest.raises(ValueError, match="MAC count"):
            acct.add_macs("forward", bad)
    with pytest.raises(ValueError, match="activation access count"):
        acct.add_accesses("forward", act=-5)
    with pytest.raises(ValueError, match="weight access count"):
        acct.add_accesses("forward", weight=-5)
    with pytest.raises(ValueError, match="access width"):
        acct.add_accesses("forward", act=1, bits=64)
    with pytest.raises(ValueError, match="seconds"):
        acct.add_seconds("forward", -0.1)
    for phase in ("", "  ", 3, None):
        with pytest.raises(ValueError, match="phase is a non-empty name"):
            acct.add_macs(phase, 1)
    with pytest.raises(ValueError, match="'total' is the name of the table's sum row"):
        acct.add_macs("total", 1)
    with pytest.raises(ValueError, match=r"no phase 'predictor'.*'forward', 'backward'"):
        acct.energy_j("predictor")
    with pytest.raises(ValueError, match="no phase 'x'.*none yet"):
        EnergyAccount().seconds("x")
    with pytest.raises(ValueError, match="access kind"):
        EnergyModel().access_pj("psum")
    with pytest.raises(ValueError, match="different energy models"):
        acct.merge(EnergyAccount(EnergyModel(mac_pj=1.0)))
    with pytest.raises(ValueError, match="priced by"):
        EnergyAccount(EnergyModel(mac_pj=1.0)).load_state_dict(acct.state_dict())
    with pytest.raises(TypeError, match="EnergyModel"):
        EnergyAccount({"mac_pj": 1.0})
    before = acct.table()  # nothing above changed the account
    assert before == _example().table() and not math.isnan(acct.energy_j())


def test_doc_examples_run():
    """docs/e2train.md's energy example runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "e2train.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/e2train.md example 0", "exec"), scope)  # noqa: S102 (our own docs)
    assert scope["acct"].energy_j() > 0
