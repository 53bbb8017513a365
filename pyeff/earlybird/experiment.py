"""`pyeff reproduce earlybird`: early-bird tickets against network slimming (prune after training) on
VGG-16 and PreResNet-20, all of `shapes`, pruning ratios 0.3 / 0.5 / 0.7.

Per network:
  search   one dense run with Network Slimming's penalty (s = 1e-4 on the BatchNorm scales), SGD lr 0.1,
           momentum 0.9, weight decay 1e-4, the step schedule (lr / 10 at 50% and 75% of the epochs), with
           `EarlyBird` watching every epoch (window 5, threshold 0.1). Its final network is the unpruned
           reference and network slimming's starting point; EarlyBird keeps the weights at each draw.
  EB       per ratio: the ticket (weights and mask at its draw epoch) slimmed by pyeff.prune.slim, then
           trained to the end of the search's schedule (the epochs left, the learning rate where the
           schedule was). Cost: the draw epoch's dense epochs + the slim epochs.
  NS       per ratio: the final dense network's mask, slimmed, fine-tuned `ft_epochs` at lr 0.1 with the step
           schedule (Network Slimming's recipe, shortened; the paper fine-tunes as long as it trains, so this
           is cheaper for NS than the paper's protocol). Cost: all dense epochs + the fine-tune epochs.
Energy: MACs of conv / linear layers per training sample (forward + backward, counted by the same EnergyHook
rules as E2-Train's report) x images x epochs, priced by pyeff.energy.EnergyModel (45 nm, fp32). Time: the
Trainer's measured epoch times (evaluation excluded), all in this run on this machine.

Why these sizes (training steps measured at batch 128 on a 2-core AMD EPYC): VGG-16 at full width (313 M MACs
per 32x32 image) would take minutes per epoch; at half width it trains at ~535 images/s (37 s an epoch of 20k
images), at quarter width (16-32-64-128-128 channels) at ~1640 images/s (12 s). PreResNet-20 (for the paper's
PreResNet-101) trains at ~750 images/s (27 s). The search runs 25 epochs: with a window of 5 masks a ticket
cannot be drawn before epoch 5, so 25 is the shortest search at which "drawn within the first 20% of the
epochs" can hold at all. At 25 epochs, half-width VGG-16 would not fit the hour beside PreResNet-20, so VGG-16
runs at quarter width. Estimate: ~13 min for VGG-16, ~25 min for PreResNet-20.
"""
from __future__ import annotations

import os
import time

from pyeff.experiments import register_experiment

RATIOS = (0.3, 0.5, 0.7)
# (label, zoo name, builder kwargs)
NETWORKS = (("VGG-16 (half width)", "vgg16", {"width": 0.5}), ("PreResNet-20", "preresnet20", {}))
QUICK = dict(train_subset=384, test_subset=256, batch_size=64, epochs=6, ft_epochs=1, window=2, lr=0.05,
             vgg_width=0.125, networks=("vgg16", "preresnet20"))
FULL = dict(train_subset=None, test_subset=None, batch_size=128, epochs=25, ft_epochs=8, window=5, lr=0.1,
            vgg_width=0.25, networks=("vgg16", "preresnet20"))
PENALTY = 1e-4
THRESHOLD = 0.1


def _params(quick: bool, overrides: dict, threads) -> dict:
    """The preset of the mode with `--set` overrides applied (unknown names are an error)."""
    import torch

    P = dict(QUICK if quick else FULL)
    unknown = sorted(set(overrides) - set(P))
    if unknown:
        raise ValueError(f"unknown overrides {unknown}; known: {sorted(P)} plus threads, dataset")
    P.update(overrides)
    if threads:
        torch.set_num_threads(threads)
    return P


def _milestones(epochs: int) -> tuple:
    return tuple(sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)}))


@register_experiment("earlybird", "Early-Bird tickets vs network slimming on VGG-16 / PreResNet-20 (shapes): the "
                                  "draw epoch, accuracy and training energy / time per pruning ratio",
                     claims=lambda result: claims_of(result))
def run(out_dir, quick, data_dir=None, seed=0, *, dataset="shapes", threads=None, **overrides) -> dict:
    from pyeff.train.phases import load_subsets, recipe_config

    P = _params(quick, overrides, threads)
    t_start = time.perf_counter()
    rows, searches, plots = [], {}, []
    for label, name, kw in NETWORKS:
        if name not in P["networks"]:
            continue
        kw = {"width": P["vgg_width"]} if name == "vgg16" else dict(kw)
        if name == "vgg16":
            label = f"VGG-16 (width x{P['vgg_width']:g})"
        common = recipe_config(model=name, dataset=dataset, data_dir=data_dir, batch_size=P["batch_size"],
                               seed=seed, train_subset=P["train_subset"], test_subset=P["test_subset"],
                               device="cpu", schedule="step")
        data = load_subsets(common)
        net_rows, search = _one_network(label, name, kw, common, data, P, os.path.join(out_dir, name))
        rows += net_rows
        searches[label] = search
        plots.append(_plot_distances(search, os.path.join(out_dir, f"{name}_mask_distance.png")))
    summary = {"dataset": dataset, "networks": ", ".join(searches), "ratios": ", ".join(f"{r:g}" for r in RATIOS),
               "search epochs": P["epochs"], "NS fine-tune epochs": P["ft_epochs"],
               "window / threshold": f"{P['window']} / {THRESHOLD}", "penalty s": PENALTY,
               "experiment minutes": (time.perf_counter() - t_start) / 60}
    for label, s in searches.items():
        summary[f"{label}: tickets drawn at epoch"] = ", ".join(
            f"{r:g}: {s['drawn'].get(str(r), '-')}" for r in RATIOS)
    plots.append(_plot_costs(rows, os.path.join(out_dir, "earlybird_cost.png")))
    notes = ("EB = the early-bird ticket (mask and weights at its draw) slimmed and trained to the end of the "
             "search's schedule; NS = network slimming: the fully trained network's mask, slimmed, fine-tuned. "
             "'unpruned' is the search run's final dense network (trained with the slimming penalty). Energy: "
             "conv / linear MACs of forward + backward per training image x images x epochs, fp32 at 45 nm "
             "(pyeff.energy.EnergyModel); BatchNorm, activations, memory accesses and the optimizer are not "
             "counted. Training s: the Trainer's measured epoch times in this run (evaluation excluded). "
             "Slimming is exact (pyeff.prune.slim == the masked network); where a ratio's mask keeps channels "
             "that are tied through residual additions, they stay, zeroed, so FLOPs fall less than the ratio.")
    return {"summary": summary, "table": rows, "plots": [os.path.relpath(p, out_dir) for p in plots],
            "notes": notes, "searches": searches,
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in P.items()}}


def _one_network(label, name, kw, common, data, P, out_dir):
    import copy

    import torch

    from pyeff.e2train.experiment import _dense_energy_per_sample
    from pyeff.energy import EnergyModel
    from pyeff.experiments.measure import accuracy_percent, count_flops
    from pyeff.prune import slim
    from pyeff.train import TrainConfig, run_training

    train_set, test_set = data
    shape = tuple(train_set.images.shape[1:])
    energy = EnergyModel()
    E, lr = P["epochs"], P["lr"]
    miles = _milestones(E)

    print(f"== {label}: search ({E} epochs, slimming penalty, EarlyBird watching)", flush=True)
    tr, eb = _search(name, kw, common, data, os.path.join(out_dir, "search"), epochs=E, lr=lr, window=P["window"],
                     milestones=miles)
    hist = tr.history
    dense = tr.model.cpu().eval()
    dense_epoch_s = [r["epoch_time"] for r in hist]
    dense_j, dense_macs = _dense_energy_per_sample(copy.deepcopy(dense), shape, energy)
    images = len(train_set)
    x1 = torch.zeros(1, *shape)
    dense_flops = count_flops(dense, x1.shape)
    unpruned = accuracy_percent(dense, test_set)
    rows = [{"network": label, "method": "unpruned", "ratio": 0.0, "accuracy %": unpruned, "FLOPs %": 100.0,
             "params": sum(p.numel() for p in dense.parameters()), "dense epochs": E, "slim epochs": 0,
             "ticket epoch": None, "training energy (J)": dense_j * images * E,
             "training s": sum(dense_epoch_s)}]
    for r in RATIOS:
        for method in ("EB", "NS"):
            if method == "EB":
                t = eb.drawn.get(r)
                if t is None:
                    print(f"   {label} ratio {r:g}: no early-bird ticket drawn in {E} epochs", flush=True)
                    rows.append({"network": label, "method": "EB", "ratio": r, "accuracy %": None,
                                 "note": f"no ticket drawn in {E} epochs"})
                    continue
                src = copy.deepcopy(dense)
                src.load_state_dict(eb.tickets[r])
                keep = eb.mask(r, eb.masks[r][t - 1])
                epochs = E - t
                lr_now = lr * (0.1 ** sum(t >= m for m in miles))
                ms = tuple(m - t for m in miles if m > t)
                dense_epochs, t_dense = t, sum(dense_epoch_s[:t])
            else:
                src, keep, t = dense, eb.mask(r, eb.masks[r][-1]), None
                epochs, lr_now, ms = P["ft_epochs"], lr, _milestones(P["ft_epochs"])
                dense_epochs, t_dense = E, sum(dense_epoch_s)
            small = slim(src, keep, x1).train()
            flops = count_flops(small, x1.shape)
            small_j, _ = _dense_energy_per_sample(copy.deepcopy(small), shape, energy)
            if epochs > 0:
                scfg = TrainConfig(epochs=epochs, lr=lr_now, milestones=ms,
                                   out_dir=os.path.join(out_dir, f"{method}-{r:g}"), **common)
                str_ = run_training(scfg, model=small, data=data, verbose=False)
                slim_s = sum(h["epoch_time"] for h in str_.history)
                small = str_.model.cpu()
            else:
                slim_s = 0.0
            acc = accuracy_percent(small.eval(), test_set)
            row = {"network": label, "method": method, "ratio": r, "accuracy %": acc,
                   "FLOPs %": 100 * flops / dense_flops, "params": sum(p.numel() for p in small.parameters()),
                   "dense epochs": dense_epochs, "slim epochs": epochs, "ticket epoch": t,
                   "training energy (J)": dense_j * images * dense_epochs + small_j * images * epochs,
                   "training s": t_dense + slim_s}
            rows.append(row)
            print(f"   {label} {method} {r:g}: {acc:.2f}% at {row['FLOPs %']:.1f}% FLOPs, "
                  f"{row['training energy (J)']:.4g} J, {row['training s']:.0f} s", flush=True)
    search = {"epochs": E, "window": P["window"], "drawn": {str(r): e for r, e in eb.drawn.items()},
              "distance_matrix": {str(r): eb.distance_matrix(r).tolist() for r in RATIOS},
              "max_distance": [{str(r): (max(d) if d else None) for r, d in h["distances"].items()} for h in eb.history],
              "unpruned accuracy %": unpruned, "dense MACs per training image": dense_macs,
              "test accuracy per epoch": [100 * h["test_acc"] for h in hist]}
    return rows, search


def _search(name, kw, common, data, out_dir, *, epochs, lr, window, milestones=(), s=PENALTY, schedule="step",
            checks_per_epoch=1, verbose=True):
    """One dense search run with the slimming penalty and EarlyBird watching: (trainer, EarlyBird)."""
    import torch

    from pyeff.earlybird import EarlyBird, SlimmingPenalty
    from pyeff.models import create_model
    from pyeff.train import TrainConfig, run_training

    train_set = data[0]
    torch.manual_seed(common["seed"])
    model = create_model(name, num_classes=train_set.num_classes, in_channels=train_set.images.shape[1], **kw)
    eb = EarlyBird(model, RATIOS, window=window, threshold=THRESHOLD, keep_weights=True,
                   checks_per_epoch=checks_per_epoch)
    cfg = TrainConfig(epochs=epochs, lr=lr, out_dir=out_dir, **{**common, "schedule": schedule},
                      **({"milestones": milestones} if schedule == "step" else {}))
    hooks = ([SlimmingPenalty(model, s)] if s else []) + [eb]
    return run_training(cfg, model=model, data=data, hooks=hooks, verbose=verbose), eb


# the search under other recipes (docs/reproduce.md, section 4): what makes the masks settle early
RECIPES = {"paper: s=1e-4, lr 0.1, step schedule": {},
           "10x penalty (s=1e-3)": {"s": 1e-3},
           "no penalty (s=0)": {"s": 0.0},
           "cosine schedule": {"schedule": "cosine"},
           # the paper's window spans 5 of 160 epochs (3%); 4 checks an epoch make 5 checks span 5% of 25
           "4 mask checks per epoch": {"checks_per_epoch": 4}}


@register_experiment("earlybird-recipes", "Early-Bird's search on VGG-16 (quarter width) under five recipes "
                                          "(paper, 10x penalty, no penalty, cosine schedule, 4 mask checks an epoch): "
                                          "when each ticket is drawn",
                     claims=lambda result: recipe_claims(result))
def recipes(out_dir, quick, data_dir=None, seed=0, *, dataset="shapes", threads=None, **overrides) -> dict:
    from pyeff.experiments.measure import accuracy_percent
    from pyeff.train.phases import load_subsets, recipe_config

    P = _params(quick, overrides, threads)
    common = recipe_config(model="vgg16", dataset=dataset, data_dir=data_dir, batch_size=P["batch_size"], seed=seed,
                           train_subset=P["train_subset"], test_subset=P["test_subset"], device="cpu")
    data = load_subsets(common)
    E, rows, curves = P["epochs"], [], {}
    for i, (label, change) in enumerate(RECIPES.items()):
        print(f"== recipe {label}", flush=True)
        tr, eb = _search("vgg16", {"width": P["vgg_width"]}, common, data, os.path.join(out_dir, f"recipe-{i}"),
                         epochs=E, lr=P["lr"], window=P["window"], milestones=_milestones(E), verbose=False, **change)
        row = {"recipe": label, "accuracy %": accuracy_percent(tr.model.eval(), data[1]), "epochs": E}
        for r in RATIOS:
            row[f"ticket epoch p={r:g}"] = eb.drawn.get(r)
        rows.append(row)
        curves[label] = [{str(r): (max(d) if d else None) for r, d in h["distances"].items()} for h in eb.history]
        print(f"   {row}", flush=True)
    plot = os.path.join(out_dir, "recipes_max_distance.png")
    _plot_recipe_curves(curves, P["window"], plot)
    return {"summary": {"network": f"VGG-16 (width x{P['vgg_width']:g})", "epochs": E, "window": P["window"],
                        "threshold": THRESHOLD},
            "table": rows, "plots": [os.path.relpath(plot, out_dir)], "curves": curves,
            "notes": "Each recipe: one search run (no slimming, no retraining) with EarlyBird watching; the ticket "
                     "epoch is the first epoch whose mask is within the threshold of the window's other masks.",
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in P.items()}}


def recipe_claims(result: dict) -> list:
    from pyeff.experiments import claim

    rows = result["table"]
    E = result["summary"]["epochs"]
    early = [r for r in rows if all(r[f"ticket epoch p={p:g}"] is not None and r[f"ticket epoch p={p:g}"] <= 0.2 * E
                                    for p in RATIOS)]
    meas = "; ".join(f"{r['recipe']}: " + "/".join(str(r[f'ticket epoch p={p:g}'] or '-') for p in RATIOS)
                     + f" ({r['accuracy %']:.1f}%)" for r in rows)
    return [claim("some recipe draws every ticket within the first 20% of the epochs",
                  "tickets at epoch ~10-30 of 160", f"ticket epochs at p=0.3/0.5/0.7 of {E}: {meas}",
                  bool(early) if result["summary"]["window"] / E <= 0.2 else None)]


def _plot_recipe_curves(curves, window, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RATIOS), figsize=(4.6 * len(RATIOS), 3.6))
    for ax, r in zip(axes, RATIOS):
        for label, hist in curves.items():
            ys = [h.get(str(r)) for h in hist]
            ax.plot([i + 1 for i, y in enumerate(ys) if y is not None], [y for y in ys if y is not None], label=label)
        ax.axhline(THRESHOLD, color="gray", ls="--", lw=0.8)
        ax.set_title(f"p = {r:g}: newest mask's largest distance in the window", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def claims_of(result: dict) -> list:
    """The paper's claims against an earlybird result (rules in docs/earlybird.md)."""
    from pyeff.experiments import claim

    rows, out = result["table"], []
    searches = result.get("searches", {})
    # 1. the ticket appears within the first 10-20% of the epochs
    parts, ok, testable = [], True, True
    for label, s in searches.items():
        E, w = s["epochs"], s["window"]
        drawn = {float(k): v for k, v in s["drawn"].items()}
        parts.append(f"{label}: " + ", ".join(f"p={r:g} epoch {drawn[r]} ({100 * drawn[r] / E:.0f}%)" if r in drawn
                                              else f"p={r:g} none in {E}" for r in RATIOS))
        ok &= all(r in drawn and drawn[r] <= 0.2 * E for r in RATIOS)
        testable &= w / E <= 0.2
    text = "the early-bird ticket appears within the first 10-20% of the training epochs"
    paper = "VGG16 / PreResNet101 on CIFAR-10/100: drawn at epoch ~10-30 of 160"
    if not searches:
        out.append(claim(text, paper, "not tested: no search ran", None))
    elif not testable:
        out.append(claim(text, paper, "; ".join(parts) + f" -- not testable at this length: a window of "
                                      f"{next(iter(searches.values()))['window']} masks cannot draw before epoch "
                                      "window, which is more than 20% of the epochs here", None))
    else:
        out.append(claim(text, paper, "; ".join(parts), ok))
    by = {(r["network"], r["method"], r["ratio"]): r for r in rows}
    nets = list(dict.fromkeys(r["network"] for r in rows))
    pairs = [(by.get((n, "EB", p)), by.get((n, "NS", p))) for n in nets for p in RATIOS]
    pairs = [(e, s) for e, s in pairs if e is not None and s is not None]
    complete = bool(pairs) and all(e.get("accuracy %") is not None for e, _ in pairs)
    # 2. EB matches or beats network slimming at each ratio (within 0.5 points counts as matching)
    text = "the EB ticket matches or beats prune-after-training (network slimming) at each ratio (>= NS - 0.5 points)"
    meas = "; ".join(f"{e['network']} p={e['ratio']:g}: EB {_acc(e)} vs NS {_acc(s)}" for e, s in pairs)
    out.append(claim(text, "EB tickets reach comparable or better accuracy than network slimming at the same ratio (VGG16, PreResNet101; CIFAR-10/100)",
                     meas or "no pairs", complete and all(e["accuracy %"] >= s["accuracy %"] - 0.5 for e, s in pairs)
                     if pairs else None))
    # 3. training energy falls by the paper's factor
    paper = "up to 4.7x; VGG16 / CIFAR-100: 287.7/262.2/221.7 kJ (EB) vs 636.5/592.3/567.8 kJ (NS), 2.2-2.6x"
    ok_pairs = [(e, s) for e, s in pairs if e.get("training energy (J)")]
    factors = [s["training energy (J)"] / e["training energy (J)"] for e, s in ok_pairs]
    meas = "; ".join(f"{e['network']} p={e['ratio']:g}: {f:.2f}x" for (e, _), f in zip(ok_pairs, factors))
    out.append(claim("EB's total training energy is lower than network slimming's at every ratio",
                     paper, meas or "no pairs", bool(factors) and complete and all(f > 1 for f in factors)))
    out.append(claim("... by at least the paper's smallest VGG16 factor (2.2x)", paper, meas or "no pairs",
                     bool(factors) and complete and all(f >= 2.2 for f in factors)))
    # 4. pyeff's own: the saving shows up as measured training time
    t_pairs = [(e, s) for e, s in ok_pairs if e.get("training s")]
    meas = "; ".join(f"{e['network']} p={e['ratio']:g}: {s['training s'] / e['training s']:.2f}x "
                     f"({e['training s']:.0f} s vs {s['training s']:.0f} s)" for e, s in t_pairs)
    out.append(claim("pyeff: EB also takes less measured training time than network slimming", "not measured",
                     meas or "no pairs", bool(t_pairs) and all(s["training s"] > e["training s"] for e, s in t_pairs)))
    return out


def _acc(r) -> str:
    return "-" if r.get("accuracy %") is None else f"{r['accuracy %']:.1f}%"


def _plot_distances(search, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(RATIOS), figsize=(4.2 * len(RATIOS), 3.8))
    for ax, r in zip(axes, RATIOS):
        m = np.array(search["distance_matrix"][str(r)])
        im = ax.imshow(m, cmap="viridis", origin="upper", vmin=0, vmax=max(0.01, float(m.max()) if m.size else 1))
        n = m.shape[0]
        ax.set_xticks(range(0, n, max(1, n // 8)))
        ax.set_xticklabels([str(i + 1) for i in range(0, n, max(1, n // 8))])
        ax.set_yticks(range(0, n, max(1, n // 8)))
        ax.set_yticklabels([str(i + 1) for i in range(0, n, max(1, n // 8))])
        d = search["drawn"].get(str(r))
        ax.set_title(f"p = {r:g}" + (f", ticket at epoch {d}" if d else ", no ticket"), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("mask distance between epochs (normalised Hamming)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_costs(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for method, mk in (("EB", "o"), ("NS", "s"), ("unpruned", "*")):
            pts = [r for r in rows if r["network"] == net and r["method"] == method and r.get("accuracy %") is not None]
            ax.plot([r["training energy (J)"] for r in pts], [r["accuracy %"] for r in pts], mk, label=method, ms=8)
            for r in pts:
                if method != "unpruned":
                    ax.annotate(f"p={r['ratio']:g}", (r["training energy (J)"], r["accuracy %"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_title(net, fontsize=10)
        ax.set_xlabel("total training energy (J, estimated)")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
