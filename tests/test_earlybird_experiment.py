"""`pyeff reproduce earlybird --quick` and `earlybird-recipes --quick`: the smoke tests CI runs, and the
claim rules on hand-made results."""
import json

import pytest

from pyeff.earlybird.experiment import RATIOS, claims_of
from pyeff.experiments import rerender, run_experiments


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("earlybird-quick")
    res = run_experiments(["earlybird", "earlybird-recipes"], str(out), quick=True,
                          command="pyeff reproduce earlybird earlybird-recipes --quick")
    return out, res


def test_quick_report_has_claims_rows_and_the_distance_matrix(quick_run):
    out, res = quick_run
    assert res["failed"] == [], {k: v.get("traceback") for k, v in res["results"].items()}
    md = (out / "report.md").read_text()
    assert "Smoke test, not evidence" in md and md.index("| claim |") < md.index("| network |")
    for name in ("vgg16_mask_distance.png", "preresnet20_mask_distance.png", "earlybird_cost.png"):
        assert f"](earlybird/{name})" in md and (out / "earlybird" / name).is_file()
    r = res["results"]["earlybird"]
    methods = [(row["network"], row["method"], row["ratio"]) for row in r["table"]]
    for net in ("VGG-16 (width x0.125)", "PreResNet-20"):
        assert (net, "unpruned", 0.0) in methods
        for p in RATIOS:
            assert (net, "NS", p) in methods and (net, "EB", p) in methods
    for row in r["table"]:
        if row["method"] != "unpruned" and row.get("accuracy %") is not None:
            assert row["FLOPs %"] < 100 and row["training energy (J)"] > 0 and row["training s"] > 0
    for s in r["searches"].values():  # the matrix is square over the epochs, zero on its diagonal
        m = s["distance_matrix"]["0.5"]
        assert len(m) == s["epochs"] and all(m[i][i] == 0 for i in range(len(m)))
    assert [row["recipe"] for row in res["results"]["earlybird-recipes"]["table"]][0].startswith("paper")


def test_quick_results_round_trip_through_rerender(quick_run):
    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())
    rerender(str(out))
    after = json.loads((out / "results.json").read_text())
    assert after["experiments"]["earlybird"]["claims"] == before["experiments"]["earlybird"]["claims"]


def _row(net, method, ratio, acc, energy, secs):
    return {"network": net, "method": method, "ratio": ratio, "accuracy %": acc, "training energy (J)": energy,
            "training s": secs}


def test_claim_rules_on_hand_made_results():
    search = {"epochs": 25, "window": 5, "drawn": {"0.3": 4, "0.5": 5, "0.7": 5}}
    rows = [_row("N", "unpruned", 0.0, 94.0, 100.0, 100.0)]
    for p in RATIOS:
        rows += [_row("N", "EB", p, 93.0, 40.0, 40.0), _row("N", "NS", p, 93.3, 100.0, 110.0)]
    c = {x["claim"][:20]: x["holds"] for x in claims_of({"table": rows, "searches": {"N": search}})}
    assert list(c.values()) == [True, True, True, True, True]
    late = dict(search, drawn={"0.3": 4, "0.5": 9, "0.7": 5})   # 9 > 20% of 25
    worse = [dict(r, **{"accuracy %": 92.0}) if r["method"] == "EB" and r["ratio"] == 0.5 else r for r in rows]
    c = [x["holds"] for x in claims_of({"table": worse, "searches": {"N": late}})]
    assert c[0] is False and c[1] is False
    short = dict(search, epochs=10)   # a window of 5 over 10 epochs cannot draw within 20%
    assert claims_of({"table": rows, "searches": {"N": short}})[0]["holds"] is None
    cheap = [dict(r, **{"training energy (J)": 60.0}) if r["method"] == "NS" else r for r in rows]
    c = [x["holds"] for x in claims_of({"table": cheap, "searches": {"N": search}})]
    assert c[2] is True and c[3] is False  # lower, but only 1.5x
