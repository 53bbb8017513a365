"""The claim tables of the DFS and DDI reports are judged from the experiment's own rows by written
rules (docs/reproduce.md): each verdict flips when the numbers it rests on do."""
import pytest

from pyeff.ddi.experiment import MASKS, _claims as ddi_claims
from pyeff.dfs.experiment import HW, _claims as dfs_claims


def dfs_rows(dfs_acc=(94.0, 94.3, 94.4), skip_acc=(60.0, 80.0, 90.0), static_acc=(93.0, 94.0, 94.2),
             dfs_comp=(14.0, 26.0, 49.0), speed=1.3, hw_speed=1.5):
    rows = [{"method": "dense float", "bits": "32", "target %": "", "computation %": 100.0, "accuracy %": 94.5,
             "speed-up": 1.0, "speed-up vs best dense": 0.7}]
    for t, c, a in zip((15, 25, 50), dfs_comp, dfs_acc):
        rows.append({"method": "DFS", "bits": "0,8,32", "target %": t, "computation %": c, "accuracy %": a,
                     "speed-up": 2 * speed, "speed-up vs best dense": speed})
    for t in (15, 25, 50):
        rows.append({"method": HW, "bits": "0,8,32", "target %": t, "computation %": t, "accuracy %": 94.0,
                     "speed-up": 2 * hw_speed, "speed-up vs best dense": hw_speed})
    for t, a in zip((15, 25, 50), skip_acc):
        rows.append({"method": "skip-only", "bits": "0,32", "target %": t, "computation %": t + 0.5, "accuracy %": a,
                     "speed-up": 3.0, "speed-up vs best dense": 2.0})
    for b, c, a in zip((8, 12, 16), (6.25, 14.06, 25.0), static_acc):
        rows.append({"method": "static quant", "bits": str(b), "target %": "", "computation %": c, "accuracy %": a,
                     "speed-up": 1.5, "speed-up vs best dense": 1.0})
    return rows


def verdicts(claims):
    return [c["holds"] for c in claims]


def test_dfs_claims_hold_and_fail_with_the_numbers():
    good = dfs_claims(dfs_rows(), 94.5)
    assert [c["claim"].split()[0] for c in good] == ["DFS", "DFS", "DFS", "pyeff:", "pyeff:"]
    assert "hardware-aligned" in good[3]["claim"] and "paper's bits" in good[4]["claim"]
    assert verdicts(good) == [True, True, True, True, True]
    # below skip-only at one level
    assert dfs_claims(dfs_rows(skip_acc=(60.0, 95.0, 90.0)), 94.5)[0]["holds"] is False
    # more than 1.5 points below dense at ~25%
    assert dfs_claims(dfs_rows(dfs_acc=(94.0, 92.9, 94.4)), 94.5)[1]["holds"] is False
    # spends far more than skip-only: not "equal computation", so the claim cannot hold
    assert dfs_claims(dfs_rows(dfs_comp=(30.0, 26.0, 49.0)), 94.5)[0]["holds"] is False
    # below static 12-bit at equal cost (the 14% point against 12 bits at 14.06%)
    assert dfs_claims(dfs_rows(static_acc=(93.0, 94.5, 94.2)), 94.5)[2]["holds"] is False
    # slower than the best dense
    assert verdicts(dfs_claims(dfs_rows(speed=0.9), 94.5))[3:] == [True, False]
    assert verdicts(dfs_claims(dfs_rows(hw_speed=0.9), 94.5))[3:] == [False, True]
    assert "0.90x vs the best dense" in dfs_claims(dfs_rows(speed=0.9), 94.5)[4]["measured"]


def ddi_rows(ddi=((24.0, 94.0), (49.0, 94.4)), layer=((25.0, 91.0), (50.0, 93.0)), prune=((25.5, 93.0), (51.0, 94.0)),
             speed=1.4):
    rows = [{"method": "dense float", "FLOPs %": 100.0, "accuracy %": 94.5, "speed-up": 1.0,
             "speed-up vs best dense": 0.7}]
    for method, pts in ((MASKS, ddi), ("layer-only skipping", layer), ("static channel pruning", prune)):
        for f, a in pts:
            rows.append({"method": method, "FLOPs %": f, "accuracy %": a, "speed-up": 2 * speed,
                         "speed-up vs best dense": speed})
    return rows


SWEEP = [{"method": "DDI both (gates + budget)", "budget %": 25.0, "FLOPs %": 20.0, "max sample FLOPs %": 24.0,
          "accuracy %": 80.0},
         {"method": "DDI both (gates + budget)", "budget %": 100.0, "FLOPs %": 40.0, "max sample FLOPs %": 60.0,
          "accuracy %": 94.0}]


def test_ddi_claims_hold_and_fail_with_the_numbers():
    good = ddi_claims(ddi_rows(), SWEEP, True)
    assert verdicts(good) == [True, True, True, True, True]
    assert verdicts(ddi_claims(ddi_rows(ddi=((24.0, 93.0), (49.0, 94.4))), SWEEP, True))[:2] == [False, True]
    assert ddi_claims(ddi_rows(prune=((25.5, 94.2), (51.0, 94.0))), SWEEP, True)[1]["holds"] is False
    assert ddi_claims(ddi_rows(layer=((25.0, 95.0), (50.0, 93.0))), SWEEP, True)[2]["holds"] is False
    assert ddi_claims(ddi_rows(), SWEEP, False)[3]["holds"] is False
    assert ddi_claims(ddi_rows(speed=0.8), SWEEP, True)[4]["holds"] is False


@pytest.mark.parametrize("claims", [dfs_claims(dfs_rows(), 94.5), ddi_claims(ddi_rows(), SWEEP, True)])
def test_every_claim_names_the_paper_and_the_measurement(claims):
    for c in claims:
        assert c["claim"] and c["paper"] and c["measured"] and c["holds"] in (True, False, None)
