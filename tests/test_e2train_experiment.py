"""`pyeff reproduce e2train --quick`: the smoke test CI runs (a few hundred images, 1 epoch per row)."""
import json
import os

import pytest

from pyeff.experiments import rerender, run_experiments

COLUMNS = ("method", "epochs", "accuracy %", "training energy (J)", "training s", "energy saving %",
           "time saving %", "time speed-up")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2train-quick")
    prev = os.environ.get("PYEFF_BASELINE_CACHE")
    os.environ["PYEFF_BASELINE_CACHE"] = str(out / "baselines")
    try:
        res = run_experiments(["e2train"], str(out), quick=True, command="pyeff reproduce e2train --quick")
    finally:
        if prev is None:
            os.environ.pop("PYEFF_BASELINE_CACHE", None)
        else:
            os.environ["PYEFF_BASELINE_CACHE"] = prev
    return out, res


def test_quick_report_is_a_smoke_test_with_claims_and_rows(quick_run):
    out, res = quick_run
    assert res["failed"] == [], res["results"]["e2train"].get("traceback")
    md = (out / "report.md").read_text()
    assert "Smoke test, not evidence" in md and "mode: **quick**" in md
    assert "| claim | paper | measured here | holds here |" in md
    assert md.index("| claim |") < md.index("| method |"), "the claim table opens the section"
    assert "![e2train: e2train_energy.png](e2train/e2train_energy.png)" in md
    assert (out / "e2train" / "e2train_energy.png").is_file()
    r = res["results"]["e2train"]
    assert [row["method"] for row in r["table"]] == ["dense float (cached baseline)", "SMD", "SMD+SLU",
                                                     "SMD+SLU+PSG"]
    for row in r["table"]:
        for c in COLUMNS:
            assert row.get(c) is not None, (row["method"], c)
    for row in r["table"][1:]:
        assert row["training energy (J)"] < r["table"][0]["training energy (J)"]  # SMD drops batches
    texts = [c["claim"] for c in r["claims"]]
    assert any("80%" in t for t in texts) and any("measured training time" in t for t in texts)


def test_quick_results_round_trip_through_rerender(quick_run):
    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())
    md = open(rerender(str(out))).read()
    after = json.loads((out / "results.json").read_text())
    assert after["experiments"]["e2train"]["table"] == before["experiments"]["e2train"]["table"]
    assert after["experiments"]["e2train"]["claims"] == before["experiments"]["e2train"]["claims"]
    assert "Re-rendered" in md and "| claim | paper | measured here | holds here |" in md
