"""The experiment registry, `pyeff reproduce`, its Markdown report, and a tiny baseline run."""
import json
import os

import pytest

import pyeff.experiments as ex
from pyeff.ddi.experiment import RECIPES
from pyeff.experiments import claim, markdown_table, register_experiment, rerender, run_experiments


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry so test experiments do not leak into others."""
    ex.discover()  # the real experiments register in the real registry first
    monkeypatch.setattr(ex, "_REGISTRY", dict(ex._REGISTRY))
    return ex._REGISTRY


def _plot(path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(path)


def test_registry_lists_baseline_and_rejects_unknown(registry):
    assert "baseline" in [e.name for e in ex.list_experiments()]
    with pytest.raises(ValueError, match="unknown experiment 'nope'.*known experiments:.*baseline"):
        ex.get_experiment("nope")
    with pytest.raises(ValueError, match="no spaces|without spaces"):
        register_experiment("a b", "x")


def test_duplicate_names_are_refused(registry):
    @register_experiment("dup-test", "first")
    def one(out_dir, quick, data_dir=None, seed=0):
        return {}

    register_experiment("dup-test", "same function again")(one)  # re-import is fine

    def other(out_dir, quick, data_dir=None, seed=0):
        return {}

    with pytest.raises(ValueError, match="already registered"):
        register_experiment("dup-test", "second")(other)


def test_report_has_tables_plots_machine_and_failures(tmp_path, registry):
    seen = {}

    @register_experiment("toy", "A toy experiment with a table and a plot")
    def toy(out_dir, quick, data_dir=None, seed=0, *, scale=1):
        seen.update(out_dir=out_dir, quick=quick, seed=seed, scale=scale)
        _plot(os.path.join(out_dir, "toy.png"))
        return {"summary": {"accuracy (%)": 91.25 * scale, "params": 1234567},
                "table": [{"method": "dense", "acc": 0.9}, {"method": "ours", "acc": 0.95}],
                "tables": [{"title": "Extra", "rows": [{"k": "v|w"}]}],
                "plots": ["toy.png"], "notes": "Some *notes*.",
                "claims": [claim("toys fly", "Fig. 1: 100%", "92%", False), claim("toys land", "", "yes", True),
                           claim("toys sing", "", "not measured", None)]}

    @register_experiment("broken", "Always fails")
    def broken(out_dir, quick, data_dir=None, seed=0):
        raise RuntimeError("boom")

    res = run_experiments(["toy", "broken"], str(tmp_path), quick=True, seed=3,
                          overrides=None, command="pyeff reproduce toy broken")
    assert seen == {"out_dir": str(tmp_path / "toy"), "quick": True, "seed": 3, "scale": 1}
    assert res["failed"] == ["broken"]
    md = (tmp_path / "report.md").read_text()
    for text in ("# pyeff reproduce report", "## Machine", "torch threads", "## toy",
                 "A toy experiment", "| accuracy (%) | 91.25 |", "| params | 1,234,567 |",
                 "| method | acc |", "| dense | 0.9 |", "**Extra**", "v\\|w",
                 "![toy: toy.png](toy/toy.png)", "Some *notes*.", "## broken",
                 "**Failed:** RuntimeError: boom", "total wall time", "FAILED", "mode: **quick**",
                 "**Smoke test, not evidence.**", "| claim | paper | measured here | holds here |",
                 "| toys fly | Fig. 1: 100% | 92% | **no** |", "| toys land |  | yes | **yes** |",
                 "| toys sing |  | not measured | not tested |"):
        assert text in md, text
    assert md.index("toys fly") < md.index("| accuracy (%) |"), "the claim table opens the section"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiments"]["toy"]["summary"]["params"] == 1234567
    assert "cpu" in results["machine"] and results["experiments"]["toy"]["wall_time_s"] >= 0


def test_full_mode_report_is_not_labelled_a_smoke_test(tmp_path, registry):
    @register_experiment("toy3", "full mode")
    def toy3(out_dir, quick, data_dir=None, seed=0):
        return {"summary": {"quick": quick}}

    md = open(run_experiments(["toy3"], str(tmp_path), quick=False)["report"]).read()
    assert "mode: **full**" in md and "Smoke test" not in md


def test_claims_rule_runs_after_the_experiment_and_again_on_rerender(tmp_path, registry):
    def rule(result):
        v = result["summary"]["v"]
        return [claim("v above 1", "paper: 2", f"{v}", v > 1)]

    @register_experiment("toy4", "claims from a rule", claims=rule)
    def toy4(out_dir, quick, data_dir=None, seed=0):
        return {"summary": {"v": 3}}

    res = run_experiments(["toy4"], str(tmp_path), command="pyeff reproduce toy4")
    md = open(res["report"]).read()
    assert "| v above 1 | paper: 2 | 3 | **yes** |" in md and "Re-rendered" not in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"] == "pyeff reproduce toy4" and saved["experiments"]["toy4"]["claims"][0]["holds"]
    saved["experiments"]["toy4"]["summary"]["v"] = 0  # as if the rule had judged other numbers
    (tmp_path / "results.json").write_text(json.dumps(saved))
    md = open(rerender(str(tmp_path))).read()
    assert "| v above 1 | paper: 2 | 0 | **no** |" in md and "Re-rendered" in md and "pyeff reproduce toy4" in md
    with pytest.raises(ValueError, match="not a results.json"):
        rerender(str(tmp_path / "nowhere"))


def test_overrides_are_checked(tmp_path, registry):
    @register_experiment("toy2", "takes scale")
    def toy2(out_dir, quick, data_dir=None, seed=0, *, scale=1):
        return {"summary": {"scale": scale}}

    assert run_experiments(["toy2"], str(tmp_path), overrides={"scale": 4})["results"]["toy2"][
        "summary"] == {"scale": 4}
    res = run_experiments(["toy2"], str(tmp_path), overrides={"colour": 1})
    assert res["failed"] == ["toy2"] and "takes: scale" in res["results"]["toy2"]["error"]


def test_markdown_table():
    md = markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}])
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.5 |  |",
                               "| 2 |  | x |"]


def test_cli_unknown_experiment_and_list(capsys):
    from pyeff.cli import main

    assert main(["reproduce", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no-such-experiment'" in err and "baseline" in err
    assert main(["reproduce", "--list"]) == 0
    assert "baseline" in capsys.readouterr().out
    assert main(["reproduce", "baseline", "--set", "noequals"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def image_links(report):
    """The targets of the Markdown image links in `report`."""
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def assert_images_resolve(report):
    links = image_links(report)
    assert links, "the report embeds no image"
    for link in links:
        assert not os.path.isabs(link), link  # the report folder can move
        assert (report.parent / link).is_file(), f"{link} does not resolve from {report}"


def test_baseline_quick_tiny(tmp_path, capsys, monkeypatch):
    from pyeff.cli import main

    # the default --out is relative (runs/reproduce-...): links must resolve from the report,
    # not from the working directory
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rep"
    rc = main(["reproduce", "baseline", "--quick", "--out", "rep", "--set", "dataset='digits'",
               "--set", "epochs=1", "--set", "train_subset=96", "--set", "test_subset=48",
               "--set", "batch_size=32", "--set", "latency_batch=4", "--set",
               "latency_time=0.05", "--set", "device='cpu'"])
    assert rc == 0, capsys.readouterr().err
    assert "report:" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for text in ("## baseline", "test accuracy (%)", "parameters", "MFLOPs per image",
                 "latency per image", "training time (s)",
                 "| epoch | train loss |"):
        assert text in md, text
    assert (out / "baseline" / "train" / "curves.png").exists()
    assert image_links(out / "report.md") == ["baseline/train/curves.png"]
    s = json.loads((out / "results.json").read_text())["experiments"]["baseline"]["summary"]
    assert s["parameters"] > 250_000  # resnet20: ~0.27M
    # resnet20 on 8x8 digits: ~1/16 of its 32x32 cost (~41 MFLOPs multiply-adds x2)
    assert 2 < s["MFLOPs per image (forward)"] < 20
    assert s["inference images/s"] > 0 and 0 <= s["test accuracy (%)"] <= 100


def test_report_links_resolve_with_relative_out(tmp_path, monkeypatch, registry):
    """Plots returned relative to the experiment's folder (the contract), absolute, or (a slip the
    report forgives) relative to the working directory; the report moved elsewhere still renders."""
    monkeypatch.chdir(tmp_path)

    @register_experiment("plots", "plots given three ways")
    def plots(out_dir, quick, data_dir=None, seed=0):
        os.makedirs(os.path.join(out_dir, "sub"))
        for name in ("a.png", "b.png", "sub/c.png"):
            _plot(os.path.join(out_dir, name))
        return {"plots": ["a.png", os.path.abspath(os.path.join(out_dir, "b.png")), os.path.join(out_dir, "sub/c.png")]}

    run_experiments(["plots"], os.path.join("runs", "rep"))
    report = tmp_path / "runs" / "rep" / "report.md"
    assert image_links(report) == ["plots/a.png", "plots/b.png", "plots/sub/c.png"]
    os.rename(tmp_path / "runs", tmp_path / "moved")
    assert_images_resolve(tmp_path / "moved" / "rep" / "report.md")


def test_method_reports_link_images_relative_to_the_report(tmp_path, monkeypatch):
    """Every registered experiment, shrunk to seconds, into a relative out folder: each image link in
    the report resolves from the report's folder."""
    monkeypatch.chdir(tmp_path)
    tiny = dict(dataset="digits", train_subset=96, test_subset=48, batch_size=32, time_per_point=0.01,
                compile_dense=False)
    runs = {"baseline": dict(dataset="digits", epochs=1, train_subset=96, test_subset=48, batch_size=32,
                             latency_batch=4, latency_time=0.01, device="cpu"),
            "dfs": dict(tiny, base_epochs=1, bits=(0, 8, 32), targets=(25,), skip_targets=(25,), static_bits=(8,)),
            "ddi-recipes": dict(dataset="digits", train_subset=96, test_subset=48, batch_size=32, base_epochs=1,
                                ddi_epochs=1, only=[0, 2]),
            "ddi": dict(tiny, base_epochs=1, ddi_epochs=1, targets=(40,), layer_targets=(40,), width_targets=(40,),
                        prune_targets=(40,), budgets=(1.0,))}
    for name, overrides in runs.items():
        res = run_experiments([name], os.path.join("runs", name), quick=True, overrides=overrides)
        assert not res["failed"], res["results"][name].get("traceback")
        assert res["report"] == os.path.join("runs", name, "report.md")
        if name == "ddi-recipes":  # a table, no plot: the two recipes asked for, each measured
            assert [r["recipe"] for r in res["results"][name]["table"]] == [list(RECIPES)[0], list(RECIPES)[2]]
        else:
            assert_images_resolve(tmp_path / res["report"])
