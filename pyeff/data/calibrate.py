"""Check how hard ``shapes`` is: train a CIFAR ResNet on it from scratch and print test accuracy.

    python -m pyeff.data.calibrate                       # ResNet-20, 5 epochs, CPU
    python -m pyeff.data.calibrate --device cuda --epochs 15
    python -m pyeff.data.calibrate --cfg '{"radius": [4, 10]}'   # try other ShapesConfig knobs

Recipe: SGD lr 0.1 (cosine to 0 over the run), momentum 0.9, weight decay 5e-4, batch 128,
random crop (4-pixel zero padding) + horizontal flip. The printed numbers for the default
configuration are recorded in `pyeff.data.shapes.CALIBRATION`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from pyeff.data.base import ImageDataset, channel_stats
from pyeff.data.loader import BatchLoader
from pyeff.data.shapes import DEFAULT_N_TEST, DEFAULT_N_TRAIN, SHAPES_CLASSES, ShapesConfig, load_shapes_split


def shapes_datasets(n_train: int, n_test: int, seed: int = 0, cfg: ShapesConfig | None = None, use_cache: bool = True):
    t0 = time.perf_counter()
    xtr, ytr = load_shapes_split("train", seed, n_train, cfg, use_cache=use_cache)
    xte, yte = load_shapes_split("test", seed, n_test, cfg, use_cache=use_cache)
    gen_s = time.perf_counter() - t0
    mean, std = channel_stats(xtr)
    kw = dict(classes=SHAPES_CLASSES, mean=mean, std=std, name="shapes", hflip=True)
    return ImageDataset(xtr, ytr, split="train", **kw), ImageDataset(xte, yte, split="test", **kw), gen_s


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def train_and_eval(train: ImageDataset, test: ImageDataset, *, model_name="resnet20", epochs=5, lr=0.1,
                   batch_size=128, weight_decay=5e-4, seed=0, device="cpu", log=print) -> list[dict]:
    from pyeff.models import create_model

    torch.manual_seed(seed)
    dev = torch.device(device)
    fmt = torch.channels_last
    model = create_model(model_name, num_classes=train.num_classes, in_channels=train.channels).to(dev, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=False)
    tl = BatchLoader(train, batch_size, shuffle=True, augment=True, seed=seed, drop_last=True, device=dev)
    el = BatchLoader(test, 512, shuffle=False, augment=False, device=dev)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(tl))  # stepped per batch
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        tl.set_epoch(epoch)
        loss_sum = correct = seen = 0
        for x, y in tl:
            out = model(x.contiguous(memory_format=fmt))
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        train_s = time.perf_counter() - t0
        acc = evaluate(model, el)
        row = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen, test_acc=acc,
                   epoch_s=train_s, eval_s=time.perf_counter() - t0 - train_s)
        history.append(row)
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    return history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="model name (default: resnet20)")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default: 5)")
    p.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate (default: 0.1)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help=f"train images (default: {DEFAULT_N_TRAIN})")
    p.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help=f"test images (default: {DEFAULT_N_TEST})")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default: 0)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    p.add_argument("--cfg", default=None, help="JSON object of ShapesConfig fields to override (default: none)")
    p.add_argument("--no-cache", action="store_true", help="generate afresh, do not read or write the cache")
    args = p.parse_args(argv)
    cfg = ShapesConfig()
    if args.cfg:
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.cfg).items()}
        cfg = dataclasses.replace(cfg, **over)
    train, test, gen_s = shapes_datasets(args.n_train, args.n_test, args.seed, cfg, use_cache=not args.no_cache)
    print(json.dumps({"config": dataclasses.asdict(cfg), "load_or_generate_s": round(gen_s, 2),
                      "n_train": len(train), "n_test": len(test), "threads": torch.get_num_threads()}))
    train_and_eval(train, test, model_name=args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   seed=args.seed, device=args.device)


if __name__ == "__main__":
    main()
