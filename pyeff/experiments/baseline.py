"""The baseline every method is compared against: a dense ResNet-20 on the embedded `shapes`
set, trained with the shared loop. `make demo` runs it (`python -m pyeff reproduce baseline`)."""
from __future__ import annotations

import os

from pyeff.experiments import register_experiment

# Measured with this loop (seed 0) on an H200, torch 2.11: the full preset reaches 86.2% test
# accuracy (12 epochs: 94.7%); shapes needs ~300 SGD steps before accuracy leaves chance, so the
# quick preset trades images for steps (batch 64): 42.5% test accuracy on the 2-core CPU, a smoke
# run. Unloaded, 2 Xeon cores train ResNet-20 at ~360 images/s (batch 128) to ~450-500 (batch 64):
# full ~5-6 min, quick ~1.5 min. Shared CPUs run far slower (seen: 39 images/s).
FULL = {"epochs": 5, "train_subset": None, "test_subset": None, "batch_size": 128, "lr": 0.1}
QUICK = {"epochs": 4, "train_subset": 8000, "test_subset": 1000, "batch_size": 64, "lr": 0.05}


@register_experiment("baseline", "Dense ResNet-20 on the embedded shapes set with the shared "
                                 "training loop: accuracy, parameters, FLOPs, CPU latency")
def baseline(out_dir, quick, data_dir=None, seed=0, *, model="resnet20", dataset="shapes",
             epochs=None, train_subset=None, test_subset=None, batch_size=None, lr=None,
             latency_batch=128, latency_time=1.0, device="auto") -> dict:
    import torch

    from pyeff.experiments.measure import count_flops, count_params, inference_latency
    from pyeff.train import TrainConfig, run_training

    preset = QUICK if quick else FULL
    cfg = TrainConfig(
        model=model, dataset=dataset, data_dir=data_dir, seed=seed,
        batch_size=batch_size or preset["batch_size"], lr=lr or preset["lr"],
        epochs=epochs or preset["epochs"],
        train_subset=train_subset or preset["train_subset"],
        test_subset=test_subset or preset["test_subset"],
        out_dir=os.path.join(out_dir, "train"), overwrite=True, device=device)
    trainer = run_training(cfg)
    net, h = trainer.model, trainer.history
    c, hh, ww = trainer.train_set.images.shape[1:]
    flops = count_flops(net, (1, c, hh, ww), device=trainer.device)
    lat = inference_latency(net, (latency_batch, c, hh, ww), device=trainer.device,
                            min_run_time=latency_time)
    train_time = sum(r["epoch_time"] for r in h)
    where = (f"{lat['threads']} CPU threads" if trainer.device.type == "cpu"
             else str(trainer.device))
    summary = {
        "model": model, "dataset": dataset,
        "train / test images": f"{len(trainer.train_set)} / {len(trainer.test_set)}",
        "epochs": cfg.epochs,
        "test accuracy (%)": 100 * h[-1]["test_acc"],
        "best test accuracy (%)": 100 * max(r["test_acc"] for r in h),
        "parameters": count_params(net),
        "MFLOPs per image (forward)": flops / 1e6,
        f"latency per image (ms, batch {latency_batch}, {where})": lat["per_image_ms"],
        "inference images/s": lat["images_per_s"],
        "training time (s)": train_time,
        "training images/s": sum(r["images_per_s"] for r in h) / len(h),
        "device": str(trainer.device),
    }
    table = [{"epoch": r["epoch"], "train loss": r["train_loss"],
              "train acc (%)": 100 * r["train_acc"], "test loss": r["test_loss"],
              "test acc (%)": 100 * r["test_acc"], "lr": r["lr"], "time (s)": r["epoch_time"]}
             for r in h]
    return {
        "summary": summary, "table": table,
        "plots": [os.path.relpath(os.path.join(cfg.out_dir, "curves.png"), out_dir)],
        "notes": ("FLOPs from torch.utils.flop_counter.FlopCounterMode (a multiply-add counts "
                  "2); latency is the median of torch.utils.benchmark's blocked_autorange in "
                  f"eval mode under no_grad on {trainer.device} "
                  f"(torch {torch.__version__})."),
        "history": h, "config": cfg.to_dict(),
    }
