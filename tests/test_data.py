"""Tests of pyeff.data: datasets, the on-disk cache, and BatchLoader."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyeff.data import BatchLoader, DEFAULT_DATASET, ImageDataset, list_datasets, load_dataset
from pyeff.data import shapes as shapes_mod
from pyeff.data.loader import augment_params

N_TRAIN, N_TEST = 400, 200


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and it does not stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """One throw-away cache for the module (the small shapes sets are generated once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYEFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("PYEFF_DATA", raising=False)
        yield


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("PYEFF_CACHE", str(path))
    return path


def small_shapes(split="train", seed=0, **kw):
    return load_dataset("shapes", split, seed=seed, n_train=N_TRAIN, n_test=N_TEST, **kw)


# ---------------------------------------------------------------------------------------------
# registry and errors
def test_registry_and_errors():
    assert DEFAULT_DATASET == "shapes"
    assert {"shapes", "digits", "cifar10", "cifar100"} <= set(list_datasets())
    with pytest.raises(ValueError, match="known datasets: .*shapes"):
        load_dataset("imagenet-21k")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")
    with pytest.raises(TypeError, match="n_train"):
        load_dataset("digits", n_train=5)


# ---------------------------------------------------------------------------------------------
# shapes
def test_shapes_defaults_are_large_enough():
    assert shapes_mod.DEFAULT_N_TRAIN >= 20000 and shapes_mod.DEFAULT_N_TEST >= 5000


def test_shapes_shapes_dtypes_labels():
    tr, te = small_shapes("train"), small_shapes("test")
    for ds, n in ((tr, N_TRAIN), (te, N_TEST)):
        assert isinstance(ds, ImageDataset)
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert ds.num_classes == 10 and len(ds.classes) == 10 and ds.hflip and ds.name == "shapes"
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        # classes are exactly balanced
        assert torch.bincount(ds.labels, minlength=10).tolist() == [n // 10] * 10
    assert te.mean == tr.mean and te.std == tr.std  # test uses the train statistics
    assert all(0.05 < m < 0.95 for m in tr.mean) and all(0.05 < s < 0.5 for s in tr.std)
    x, y = tr[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)


def test_shapes_deterministic_and_seeded():
    a, _ = shapes_mod.generate_shapes(120, seed=0, split="train")
    b, _ = shapes_mod.generate_shapes(120, seed=0, split="train")
    c, _ = shapes_mod.generate_shapes(120, seed=1, split="train")
    d, _ = shapes_mod.generate_shapes(120, seed=0, split="test")
    assert a.tobytes() == b.tobytes()
    assert (a != c).mean() > 0.5 and (a != d).mean() > 0.5
    # the generator's output does not depend on torch's thread count or global RNG state
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        np.random.seed(123)
        e, _ = shapes_mod.generate_shapes(120, seed=0, split="train")
    finally:
        torch.set_num_threads(threads)
    assert e.tobytes() == a.tobytes()


def test_shapes_not_trivial():
    ds = small_shapes("train")
    x = ds.images.to(torch.float32).reshape(len(ds), -1) / 255
    y = ds.labels
    for k in range(10):
        xk = x[y == k]
        assert torch.cdist(xk, xk).add(torch.eye(len(xk)) * 1e9).min() > 0.5  # no two images alike
    per_image_std = x.std(1)
    assert per_image_std.std() > 0.02  # contrast varies from image to image
    # no pixel-level shortcut: nearest class mean on raw pixels is far from solving it
    te = small_shapes("test")
    xt = te.images.to(torch.float32).reshape(len(te), -1) / 255
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    acc = (torch.cdist(xt, means).argmin(1) == te.labels).float().mean().item()
    assert acc < 0.3


def test_shapes_convert_size_and_channels():
    ds = small_shapes("train", image_size=16, channels=1)
    assert ds.images.shape == (N_TRAIN, 1, 16, 16) and len(ds.mean) == 1


def _cache_files(cache):
    return sorted(cache.glob("shapes-*"))


def test_shapes_cache_written_atomically_and_reused(fresh_cache):
    a = small_shapes("train")
    files = _cache_files(fresh_cache)
    assert len(files) == 1 and "-train-" in files[0].name and files[0].suffix == ".npz"  # no temp files left
    mtime = {f: f.stat().st_mtime_ns for f in files}
    b = small_shapes("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert {f: f.stat().st_mtime_ns for f in _cache_files(fresh_cache)} == mtime  # read, not rewritten


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage", "wrong_shape"])
def test_shapes_cache_corruption_is_detected_and_regenerated(fresh_cache, damage):
    fresh, labels = shapes_mod.generate_shapes(N_TRAIN, 0, "train")
    small_shapes("train")
    (path,) = [f for f in _cache_files(fresh_cache) if "-train-" in f.name]
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_bytes":
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 64]) + raw[mid + 64:])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        np.savez(path, images=fresh[:10], labels=labels[:10])  # a valid file of the wrong shape
    ds = small_shapes("train")
    assert ds.images.numpy().tobytes() == fresh.tobytes()
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    # and the cache was repaired
    assert path.read_bytes() != b"not a zip file"
    with np.load(path) as z:
        assert z["images"].shape == (N_TRAIN, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# digits
def test_digits():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and abs(len(te) - 0.2 * 1797) < 2
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and int(tr.labels.max()) == 9 and int(tr.labels.min()) == 0
    assert not tr.hflip and tr.num_classes == 10 and te.mean == tr.mean
    counts = torch.bincount(te.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified
    again = load_dataset("digits", "test")
    other = load_dataset("digits", "test", seed=1)
    assert torch.equal(again.images, te.images)
    assert not torch.equal(other.images, te.images)
    big = load_dataset("digits", "train", image_size=32, channels=3)
    assert big.images.shape == (len(tr), 3, 32, 32) and len(big.mean) == 3
    assert torch.equal(big.images[:, 0], big.images[:, 2])


# ---------------------------------------------------------------------------------------------
# CIFAR from files written here in the real pickle layout
def _write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar(root, which, per_file=6, rng=None):
    rng = rng or np.random.default_rng(0)
    expect = {}
    if which == "cifar10":
        folder, nc, lk = root / "cifar-10-batches-py", 10, b"labels"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        _write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                                 b"num_cases_per_batch": per_file})
    else:
        folder, nc, lk = root / "cifar-100-python", 100, b"fine_labels"
        files = {"train": ["train"], "test": ["test"]}
        _write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                        b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    for split, names in files.items():
        xs, ys = [], []
        for name in names:
            x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, nc, per_file).tolist()
            d = {b"data": x, lk: y, b"batch_label": name.encode()}
            if which == "cifar100":
                d[b"coarse_labels"] = [v // 5 for v in y]
            _write_pickle(folder / name, d)
            xs.append(x)
            ys += y
        expect[split] = (np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys))
    return folder, expect


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_reads_pickle_layout(tmp_path, which):
    folder, expect = _make_cifar(tmp_path, which)
    nc = 10 if which == "cifar10" else 100
    for data_dir in (tmp_path, folder, str(folder)):  # the parent or the batches folder itself
        for split in ("train", "test"):
            ds = load_dataset(which, split, data_dir=data_dir)
            x, y = expect[split]
            assert ds.images.shape == x.shape and ds.images.dtype == torch.uint8
            assert np.array_equal(ds.images.numpy(), x) and np.array_equal(ds.labels.numpy(), y)
            assert ds.num_classes == nc and ds.hflip and ds.classes[1] == ("c1" if nc == 10 else "f1")
    tr = load_dataset(which, "train", data_dir=tmp_path)
    xf = expect["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(tr.mean, xf.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(tr.std, xf.std(axis=(0, 2, 3)), atol=1e-9)


def test_cifar_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1.*cifar-10-python.tar.gz"):
        load_dataset("cifar10")  # no data_dir, no $PYEFF_DATA
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", data_dir=tmp_path)  # exists but empty
    folder, _ = _make_cifar(tmp_path, "cifar10")
    monkeypatch.setenv("PYEFF_DATA", str(tmp_path))
    assert len(load_dataset("cifar10", "test")) == 6  # $PYEFF_DATA as the default data_dir
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    _write_pickle(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    _write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match="labels outside"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# ImageDataset
def test_normalize_getitem_subset():
    ds = small_shapes("train")
    x = ds.normalize(ds.images[:5])
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.images[:5].float() / 255 - mean) / std)
    torch.testing.assert_close(ds[2][0], x[2])
    sub = ds.subset(95, seed=3)
    assert len(sub) == 95 and sub.mean == ds.mean and sub.classes == ds.classes
    counts = torch.bincount(sub.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(sub.images, ds.subset(95, seed=3).images)
    assert not torch.equal(sub.labels, ds.subset(95, seed=4).labels) or not torch.equal(
        sub.images, ds.subset(95, seed=4).images)
    with pytest.raises(ValueError):
        ds.subset(len(ds) + 1)


# ---------------------------------------------------------------------------------------------
# BatchLoader
def _batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_shapes_len_and_determinism():
    ds = small_shapes("train")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = BatchLoader(ds, 64, shuffle=True, augment=True, seed=5)
    b = BatchLoader(ds, 64, shuffle=True, augment=True, seed=5)
    assert len(a) == 7 and len(BatchLoader(ds, 64, shuffle=True, augment=True, drop_last=True)) == 6
    ba, bb = _batches(a, 2), _batches(b, 2)
    assert len(ba) == 7 and ba[-1][0].shape == (N_TRAIN - 6 * 64, 3, 32, 32)
    for (xa, ya), (xb, yb) in zip(ba, bb):
        assert xa.dtype == torch.float32 and ya.dtype == torch.int64 and xa.shape[1:] == (3, 32, 32)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(torch.cat([y for _, y in ba]).tolist()) == sorted(ds.labels.tolist())  # each sample once
    other_epoch = _batches(a, 3)
    assert not torch.equal(ba[0][1], other_epoch[0][1])
    assert not torch.equal(_batches(BatchLoader(ds, 64, shuffle=True, augment=True, seed=6), 2)[0][0], ba[0][0])
    # the global RNGs are untouched
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(p, q) for p, q in zip(np.random.get_state(), np_state))


def test_loader_without_shuffle_or_augment_is_the_dataset():
    ds = small_shapes("test")
    xs, ys = zip(*BatchLoader(ds, 48, shuffle=False, augment=False))
    torch.testing.assert_close(torch.cat(xs), ds.normalize(ds.images), rtol=0, atol=0)
    assert torch.equal(torch.cat(ys), ds.labels)


def test_loader_augmentation_matches_per_sample_reference():
    ds = small_shapes("train")
    loader = BatchLoader(ds, 50, shuffle=True, augment=True, seed=1)
    loader.set_epoch(4)
    order = np.random.default_rng([1, 4, 0x10AD]).permutation(len(ds))  # the loader's documented order
    x, y = next(iter(loader))
    dy, dx, fl = augment_params(1, 4, np.arange(50), 4, True)
    assert 0 < fl.sum() < 50 and dy.min() >= 0 and dy.max() <= 8 and len(set(dx.tolist())) > 3
    for k in range(50):
        img = F.pad(ds.images[order[k]], (4, 4, 4, 4))[:, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32]
        if fl[k]:
            img = img.flip(-1)
        torch.testing.assert_close(x[k], ds.normalize(img), rtol=0, atol=0)
        assert y[k] == ds.labels[order[k]]
    # padding is zero in uint8 space: those pixels normalise to -mean/std
    k = int(np.argmax((dy == 0) & (dx == 0)))
    if dy[k] == 0 and dx[k] == 0:
        torch.testing.assert_close(x[k, :, 0, 0], -torch.tensor(ds.mean) / torch.tensor(ds.std))


def test_loader_no_flip_for_digits():
    ds = load_dataset("digits", "train")
    loader = BatchLoader(ds, 32, shuffle=False, augment=True)
    assert loader.crop_padding == 1  # H // 8 for 8x8 images
    _, _, fl = augment_params(0, 0, np.arange(len(ds)), loader.crop_padding, ds.hflip)
    assert not fl.any()
    x, _ = next(iter(loader))
    assert x.shape == (32, 1, 8, 8)


@pytest.mark.parametrize("n,world,drop_last", [(400, 2, True), (400, 4, False), (397, 3, True), (397, 3, False)])
def test_loader_rank_shards_interleave_the_single_process_batches(n, world, drop_last):
    ds = small_shapes("train").subset(n) if n != N_TRAIN else small_shapes("train")
    bs = 16
    single = BatchLoader(ds, bs * world, shuffle=True, augment=True, seed=7, drop_last=drop_last)
    ranks = [BatchLoader(ds, bs, shuffle=True, augment=True, seed=7, drop_last=drop_last, rank=r, world_size=world)
             for r in range(world)]
    for epoch in (0, 1):
        s_batches = _batches(single, epoch)
        r_batches = [_batches(rl, epoch) for rl in ranks]
        assert all(len(rb) == len(s_batches) == len(single) for rb in r_batches)
        for t, (xs, ys) in enumerate(s_batches):
            for r in range(world):
                xr, yr = r_batches[r][t]
                m = len(ys[r::world])
                assert torch.equal(xr[:m], xs[r::world]) and torch.equal(yr[:m], ys[r::world])
                # only the final batch of a non-divisible split carries the DistributedSampler padding
                assert len(yr) == m or (not drop_last and t == len(s_batches) - 1 and len(yr) - m <= 1)
        if not drop_last:  # every sample is seen by some rank
            seen = torch.cat([y for rb in r_batches for _, y in rb])
            assert len(seen) == -(-n // world) * world


def test_loader_argument_checks():
    ds = small_shapes("test")
    with pytest.raises(ValueError):
        BatchLoader(ds, 0, shuffle=False, augment=False)
    with pytest.raises(ValueError):
        BatchLoader(ds, 8, shuffle=False, augment=False, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_on_cuda_matches_cpu():
    ds = small_shapes("train")
    cpu = _batches(BatchLoader(ds, 64, shuffle=True, augment=True, seed=3), 1)
    gpu = _batches(BatchLoader(ds, 64, shuffle=True, augment=True, seed=3, device="cuda"), 1)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc)
