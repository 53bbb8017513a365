"""Measurements shared by the experiments: parameters, FLOPs (FlopCounterMode), latency
(torch.utils.benchmark), and the machine the numbers came from."""
from __future__ import annotations

import logging
import os
import platform
import sys

import torch


class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def benchmark_module():
    """torch.utils.benchmark, imported without the "No CUDA runtime is found, using CUDA_HOME=..."
    warning. It imports torch.utils.cpp_extension, which logs that line on import on every machine
    without a GPU but with a CUDA toolkit (or CUDA_HOME) present: noise for CPU timing, which
    compiles nothing. Only that message of that logger is dropped, only during the import."""
    if "torch.utils.benchmark" in sys.modules:
        return sys.modules["torch.utils.benchmark"]
    log = logging.getLogger("torch.utils.cpp_extension")  # the module's own logger (getLogger(__name__))
    quiet = _NoCudaRuntimeFilter()
    log.addFilter(quiet)
    try:
        from torch.utils import benchmark
    finally:
        log.removeFilter(quiet)
    return benchmark


def latency_on(model, x, min_run_time: float = 1.0) -> float:
    """Milliseconds per image of model(x) in eval under no_grad, on the given batch (real images
    matter for dynamic models: their decisions, hence their work, depend on the input); median of
    torch.utils.benchmark's blocked_autorange after a warm-up call."""
    benchmark = benchmark_module()
    was = model.training
    model.eval()

    def run():
        with torch.no_grad():
            return model(x)
    run()
    m = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    model.train(was)
    return 1e3 * m.median / x.shape[0]


def accuracy_percent(model, data, batch_size: int = 256) -> float:
    """Top-1 accuracy in % of `model` (eval mode, no grad) on a dataset (an ImageDataset) or a loader
    over one; a model may return logits, (logits, aux) or a dict with "logits"."""
    from pyeff.data import BatchLoader
    from pyeff.train.hooks import split_outputs

    loader = BatchLoader(data, batch_size, shuffle=False, augment=False) if hasattr(data, "images") else data
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((split_outputs(model(xb)).logits.argmax(1) == yb).sum()) for xb, yb in loader)
    model.train(was)
    return 100 * correct / len(loader.dataset)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model, input_shape, device="cpu") -> int:
    """Forward FLOPs of one call on a zero input of `input_shape` (FlopCounterMode counts a
    multiply-add as 2 FLOPs). Pass a batch of 1 for FLOPs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(*input_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def inference_latency(model, input_shape, device="cpu", min_run_time=1.0, threads=None) -> dict:
    """Median wall time of model(x) in eval mode under no_grad, via
    torch.utils.benchmark.Timer.blocked_autorange (which warms up and repeats).

    Returns {"batch_ms", "per_image_ms", "images_per_s", "threads", "batch"}.
    """
    benchmark = benchmark_module()
    threads = threads or torch.get_num_threads()
    was_training = model.training
    model.eval()
    x = torch.randn(*input_shape, device=device)

    def run():
        with torch.no_grad():
            out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    run()  # warm-up (allocations, lazy init)
    m = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    model.train(was_training)
    batch = input_shape[0]
    return {"batch_ms": 1e3 * m.median, "per_image_ms": 1e3 * m.median / batch,
            "images_per_s": batch / m.median, "threads": threads, "batch": batch}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from pyeff import __version__, _extension
        info["pyeff"] = __version__
        info["pyeff_extension"] = "loaded" if _extension.loaded() else "not loaded"
    except Exception:  # noqa: BLE001  (the report must not fail on a half-built package)
        pass
    return info


DENSE_NCHW = "NCHW eager"
DENSE_CL = "channels_last"
DENSE_FOLDED = "channels_last, BN folded (torch.fx fuse)"
DENSE_COMPILED = "channels_last, BN folded, torch.compile"
DENSE_FROZEN = "channels_last, BN folded, torch.compile with inductor freezing"
MICRO_BATCH = 32


def micro_batched(fn, x: torch.Tensor, size: int = MICRO_BATCH):
    """A thunk running fn over `x` in micro-batches of `size` samples, outputs concatenated (for an
    fn that treats samples independently: inference). On CPUs a batch's activations (8 MB at
    128 x 16 x 32 x 32) fall out of the caches and each fresh one is faulted in again; a whole
    network run on 32 samples at a time keeps them resident (a 2-core AMD EPYC: the folded dense
    ResNet-38 140 -> 78 ms at batch 128)."""
    chunks = x.split(size) if size is not None and 0 < size < x.shape[0] else (x,)
    if len(chunks) == 1:
        return lambda: fn(x)
    return lambda: torch.cat([fn(c) for c in chunks])


def dense_baselines(model: torch.nn.Module, x: torch.Tensor, label: str, compile: bool = True,
                    micro_batch: int | None = MICRO_BATCH) -> dict:
    """The dense network as a user who cares about speed would deploy it, every variant a callable
    on `x` ({row name: fn}, the NCHW eager one first): NCHW eager, channels_last, channels_last
    with BatchNorm folded into the convs, torch.compile of the folded model, and the same with
    inductor's freezing (weights as constants: oneDNN's prepacked convs with the ReLU and residual
    add fused). With `micro_batch` smaller than the batch, the folded model and the best compiled
    one also run in micro-batches of that many samples (outputs concatenated). Compiled variants
    are compiled and warmed up here, outside every timing. `label` names the network in the row
    names. Every benchmark (bench/harness.best_dense) and every experiment (`best_dense_latency`)
    takes its "best dense" from these rows, measured in its own run."""
    import copy

    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    xcl = x.contiguous(memory_format=torch.channels_last)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded = fuse(cl)
    micro = micro_batch is not None and 0 < micro_batch < x.shape[0]
    row = lambda what: f"dense {label} ({what})"  # noqa: E731
    fns = {row(DENSE_NCHW): lambda: model(x),
           row(DENSE_CL): lambda: cl(xcl),
           row(DENSE_FOLDED): lambda: folded(xcl)}
    if micro:
        fns[row(f"{DENSE_FOLDED}, micro-batches of {micro_batch}")] = micro_batched(folded, xcl, micro_batch)
    if compile:
        import torch._inductor.config as inductor_config

        # compilation (per input shape) and first-run autotuning happen here; inductor reads the
        # freezing switch when it compiles, so each model is compiled under its own setting
        compiled = torch.compile(folded)
        frozen = torch.compile(fuse(copy.deepcopy(cl)))
        with torch.no_grad():
            with inductor_config.patch(freezing=False):
                compiled(xcl), compiled(xcl)
            with inductor_config.patch(freezing=True):
                for inp in [xcl] + (list(xcl.split(micro_batch)) if micro else []):
                    frozen(inp), frozen(inp)
        fns[row(DENSE_COMPILED)] = lambda: compiled(xcl)
        fns[row(DENSE_FROZEN)] = lambda: frozen(xcl)
        if micro:
            fns[row(f"{DENSE_FROZEN}, micro-batches of {micro_batch}")] = micro_batched(frozen, xcl, micro_batch)
    return fns


def best_dense_latency(model, x, min_run_time: float = 1.0, compile: bool = True) -> tuple[str, float]:
    """(variant, ms per image) of the fastest of `dense_baselines(model, x)`, each timed like
    `latency_on` (median of blocked_autorange after a warm-up call)."""
    benchmark = benchmark_module()
    best = None
    for name, fn in dense_baselines(model, x, "", compile=compile).items():
        with torch.no_grad():
            fn()
            m = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
        ms = 1000 * m.median / x.shape[0]
        variant = name[name.index("(") + 1:name.rindex(")")]
        if best is None or ms < best[1]:
            best = (variant, ms)
    return best
