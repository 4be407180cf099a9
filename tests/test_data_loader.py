"""DeviceLoader and the batched augmentation: exactness against a per-sample reference, epochs, sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkd.data import (
    ArrayDataset,
    DatasetInfo,
    DeviceLoader,
    augment_batch,
    crop_flip,
    cutout_mask,
    draw_augmentation,
)

MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def make_data(n: int = 50, c: int = 3, h: int = 8, w: int = 8, num_classes: int = 5, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    return ArrayDataset(images, torch.arange(n) % num_classes)


# ------------------------------------------------------------------ per-sample reference implementation


def ref_crop_flip(img: np.ndarray, oy: int, ox: int, flip: bool, padding: int, mode: str) -> np.ndarray:
    """One (C, H, W) image: pad, crop the window at (oy, ox), mirror."""
    _, h, w = img.shape
    np_mode = "constant" if mode == "zero" else "reflect"
    padded = np.pad(img, ((0, 0), (padding, padding), (padding, padding)), mode=np_mode)
    out = padded[:, oy:oy + h, ox:ox + w]
    return out[:, :, ::-1] if flip else out


def ref_cutout(h: int, w: int, cy: int, cx: int, size: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    y0, x0 = cy - size // 2, cx - size // 2
    for y in range(h):
        for x in range(w):
            if y0 <= y < y0 + size and x0 <= x < x0 + size:
                mask[y, x] = True
    return mask


def ref_augment(images: torch.Tensor, draws, *, padding: int, mode: str, cutout: int, mean, std) -> torch.Tensor:
    out = []
    for b in range(images.shape[0]):
        img = ref_crop_flip(images[b].numpy(), int(draws.offsets_y[b]), int(draws.offsets_x[b]),
                            bool(draws.flips[b]), padding, mode).astype(np.float32)
        img = (img / 255.0 - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
        if cutout:
            img[:, ref_cutout(img.shape[1], img.shape[2], int(draws.cutout_y[b]), int(draws.cutout_x[b]),
                              cutout)] = 0.0
        out.append(torch.from_numpy(np.ascontiguousarray(img)))
    return torch.stack(out)


# --------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("mode", ["zero", "reflect"])
@pytest.mark.parametrize("shape,padding", [((3, 8, 8), 4), ((1, 7, 9), 3), ((2, 5, 5), 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_flip_matches_per_sample_reference(mode, shape, padding, channels_last):
    c, h, w = shape
    data = make_data(40, c, h, w)
    g = torch.Generator().manual_seed(1)
    d = draw_augmentation(40, h, w, padding=padding, flip=True, cutout=0, generator=g)
    assert int(d.offsets_y.min()) >= 0 and int(d.offsets_y.max()) <= 2 * padding
    got = crop_flip(data.images, d.offsets_y, d.offsets_x, d.flips, padding=padding, padding_mode=mode,
                    channels_last=channels_last)
    assert got.dtype == torch.uint8 and got.shape == data.images.shape
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    for b in range(40):
        want = ref_crop_flip(data.images[b].numpy(), int(d.offsets_y[b]), int(d.offsets_x[b]), bool(d.flips[b]),
                             padding, mode)
        np.testing.assert_array_equal(got[b].numpy(), want, err_msg=f"sample {b}")


def test_crop_flip_extremes():
    """Offsets 0 and 2p, flip on/off: every corner case of the padding."""
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    oy = torch.tensor([0, 0, 4, 4, 2, 2, 0, 4])
    ox = torch.tensor([0, 4, 0, 4, 2, 2, 4, 0])
    fl = torch.tensor([False, False, False, False, False, True, True, True])
    for mode in ("zero", "reflect"):
        got = crop_flip(img, oy, ox, fl, padding=2, padding_mode=mode)
        for b in range(8):
            want = ref_crop_flip(img[b].numpy(), int(oy[b]), int(ox[b]), bool(fl[b]), 2, mode)
            np.testing.assert_array_equal(got[b].numpy(), want)
    assert torch.equal(crop_flip(img, oy * 0 + 2, ox * 0 + 2, fl & False, padding=2), img)  # identity


def test_cutout_mask_matches_reference():
    g = torch.Generator().manual_seed(2)
    d = draw_augmentation(30, 6, 9, padding=0, flip=False, cutout=4, generator=g)
    for size in (1, 3, 4):
        m = cutout_mask(d.cutout_y, d.cutout_x, size, 6, 9)
        assert m.shape == (30, 1, 6, 9) and m.dtype == torch.bool
        for b in range(30):
            np.testing.assert_array_equal(m[b, 0].numpy(), ref_cutout(6, 9, int(d.cutout_y[b]), int(d.cutout_x[b]),
                                                                       size))


@pytest.mark.parametrize("mode", ["zero", "reflect"])
@pytest.mark.parametrize("cutout", [0, 3])
def test_augment_batch_matches_reference(mode, cutout):
    data = make_data(24, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    d = draw_augmentation(24, 8, 8, padding=2, flip=True, cutout=cutout, generator=g)
    for channels_last in (False, True):
        got = augment_batch(data.images, d.offsets_y, d.offsets_x, d.flips, mean=MEAN3, std=STD3, padding=2,
                            padding_mode=mode, cutout=cutout, cutout_y=d.cutout_y, cutout_x=d.cutout_x,
                            channels_last=channels_last)
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        want = ref_augment(data.images, d, padding=2, mode=mode, cutout=cutout, mean=MEAN3, std=STD3)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if cutout:
            assert (got == 0).any()


@pytest.mark.parametrize("kw", [dict(), dict(padding_mode="reflect", cutout=3), dict(channels_last=True, cutout=2)])
def test_loader_batches_equal_reference_on_the_plan(kw):
    """The loader applies exactly the draws its plan exposes, to exactly the planned samples."""
    data = make_data(37, 3, 8, 8)
    loader = DeviceLoader(data, (MEAN3, STD3), 8, train=True, crop_padding=2, seed=5, **kw)
    loader.set_epoch(2)
    plan = loader.plan(2)
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 37 // 8, drop_last default in training
    for i, (x, y) in enumerate(batches):
        sl = slice(8 * i, 8 * i + 8)
        idx = plan.indices[sl]
        want = ref_augment(data.images[idx], plan.draws[sl], padding=2, mode=kw.get("padding_mode", "zero"),
                           cutout=kw.get("cutout", 0), mean=MEAN3, std=STD3)
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, data.labels[idx])


# ----------------------------------------------------------------------------------- epochs


def served_indices(loader: DeviceLoader, data: ArrayDataset) -> list[int]:
    """Recover each served sample's index from its label (labels are made unique for this)."""
    out = []
    for _, y in loader:
        out += y.tolist()
    return out


def unique_data(n: int) -> ArrayDataset:
    return ArrayDataset(torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8), torch.arange(n))


def test_every_image_once_per_epoch():
    data = unique_data(103)
    for train in (True, False):
        loader = DeviceLoader(data, ((0.5,), (0.5,)), 10, train=train, drop_last=False)
        assert loader.num_samples == 103 and len(loader) == 11
        for epoch in range(3):
            loader.set_epoch(epoch)
            seen = served_indices(loader, data)
            assert sorted(seen) == list(range(103))
            if not train:
                assert seen == list(range(103))  # evaluation: sequential
    dropping = DeviceLoader(data, ((0.5,), (0.5,)), 10, train=True)
    assert len(dropping) == 10 and dropping.num_samples == 103
    seen = served_indices(dropping, data)
    assert len(seen) == 100 and len(set(seen)) == 100


def test_same_seed_and_epoch_same_batches_other_epoch_other_order():
    data = make_data(64, 3, 8, 8)
    a = DeviceLoader(data, (MEAN3, STD3), 16, train=True, seed=7, cutout=3)
    b = DeviceLoader(data, (MEAN3, STD3), 16, train=True, seed=7, cutout=3)
    a.set_epoch(4)
    b.set_epoch(4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.plan(4).indices, a.plan(5).indices)
    other_seed = DeviceLoader(data, (MEAN3, STD3), 16, train=True, seed=8)
    assert not torch.equal(a.plan(4).indices, other_seed.plan(4).indices)


def test_resume_reproduces_epoch_without_state():
    """A fresh loader told set_epoch(e) serves what a long-running one served at epoch e."""
    data = make_data(40, 3, 8, 8)
    running = DeviceLoader(data, (MEAN3, STD3), 8, train=True, seed=1)
    for epoch in range(3):
        running.set_epoch(epoch)
        batches = [x for x, _ in running]
    resumed = DeviceLoader(data, (MEAN3, STD3), 8, train=True, seed=1)
    resumed.set_epoch(2)
    for x, y in zip(batches, (x for x, _ in resumed), strict=True):
        assert torch.equal(x, y)


def test_iterating_without_set_epoch_advances():
    data = unique_data(30)
    loader = DeviceLoader(data, ((0.5,), (0.5,)), 30, train=True)
    first = served_indices(loader, data)
    second = served_indices(loader, data)
    assert loader.epoch == 1 and first != second
    loader.set_epoch(0)
    assert served_indices(loader, data) == first
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


@pytest.mark.parametrize("n", [90, 100])
def test_sharding_train_disjoint_equal_and_cover(n):
    data = unique_data(n)
    world = 3
    shards = []
    for rank in range(world):
        loader = DeviceLoader(data, ((0.5,), (0.5,)), 7, train=True, drop_last=False, rank=rank,
                              world_size=world, seed=3)
        loader.set_epoch(5)
        assert loader.num_samples == n // world
        shards.append(served_indices(loader, data))
    assert all(len(s) == n // world for s in shards)
    union = set().union(*map(set, shards))
    assert len(union) == sum(map(len, shards))  # disjoint
    assert len(union) == n - n % world  # covers the epoch but the (shuffled) remainder
    # the shards are cut from the same permutation a single process would serve
    single = DeviceLoader(data, ((0.5,), (0.5,)), 7, train=True, drop_last=False, seed=3).plan(5).indices
    assert union == set(single[: n - n % world].tolist())


def test_sharding_eval_exact_cover():
    data = unique_data(100)
    shards = [served_indices(DeviceLoader(data, ((0.5,), (0.5,)), 8, train=False, rank=r, world_size=3), data)
              for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(100))
    assert [len(s) for s in shards] == [34, 33, 33]


def test_augmentation_differs_across_ranks():
    data = make_data(40, 3, 8, 8)
    d0 = DeviceLoader(data, (MEAN3, STD3), 4, train=True, rank=0, world_size=2).plan(0).draws
    d1 = DeviceLoader(data, (MEAN3, STD3), 4, train=True, rank=1, world_size=2).plan(0).draws
    assert not (torch.equal(d0.offsets_y, d1.offsets_y) and torch.equal(d0.flips, d1.flips))


# ---------------------------------------------------------------------------------- outputs, errors


def test_eval_output_is_normalised_input_and_info_accepted():
    data = make_data(20, 3, 8, 8)
    info = DatasetInfo("toy", [str(i) for i in range(5)], MEAN3, STD3, in_chans=3, image_size=8)
    loader = DeviceLoader(data, info, 8, train=False)
    xs = [x for x, _ in loader]
    assert [x.shape[0] for x in xs] == [8, 8, 4] and len(loader) == 3
    x = torch.cat(xs)
    want = (data.images.float() / 255 - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
    cl = DeviceLoader(data, info, 8, train=False, channels_last=True)
    assert next(iter(cl))[0].is_contiguous(memory_format=torch.channels_last)


def test_flip_only_and_no_augmentation():
    data = make_data(16, 1, 5, 5)
    plain = DeviceLoader(data, ((0.0,), (1 / 255,)), 16, train=True, crop_padding=0, flip=False)
    x, _ = next(iter(plain))
    torch.testing.assert_close(x, data.images[plain.plan(0).indices].float())  # scale 1: raw values, shuffled
    flip = DeviceLoader(data, ((0.0,), (1 / 255,)), 16, train=True, crop_padding=0, flip=True, seed=4)
    plan = flip.plan(0)
    x, _ = next(iter(flip))
    want = torch.where(plan.draws.flips.view(-1, 1, 1, 1), data.images[plan.indices].flip(3),
                       data.images[plan.indices])
    torch.testing.assert_close(x, want.float())


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(padding_mode="wrap"), "padding_mode"),
    (dict(padding_mode="reflect", crop_padding=8), "reflect"),
    (dict(cutout=-1), "cutout"),
])
def test_loader_rejects_bad_arguments(kwargs, match):
    data = make_data(20, 3, 8, 8)
    args = dict(batch_size=4, train=True) | kwargs
    bs = args.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        DeviceLoader(data, (MEAN3, STD3), bs, **args)


def test_batch_larger_than_split_with_drop_last_yields_nothing(caplog):
    data = make_data(20, 3, 8, 8)
    loader = DeviceLoader(data, (MEAN3, STD3), 100, train=True)
    assert len(loader) == 0 and list(loader) == [] and "no batch" in caplog.text
    assert len(DeviceLoader(data, (MEAN3, STD3), 100, train=True, drop_last=False)) == 1


def test_loader_rejects_bad_norm():
    data = make_data(20, 3, 8, 8)
    with pytest.raises(ValueError, match="3 values"):
        DeviceLoader(data, ((0.5,), (0.5,)), 4, train=True)
    with pytest.raises(TypeError, match="DatasetInfo"):
        DeviceLoader(data, 0.5, 4, train=True)  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    data = make_data(64, 3, 8, 8)
    cpu = DeviceLoader(data, (MEAN3, STD3), 16, train=True, cutout=3, padding_mode="reflect")
    gpu = DeviceLoader(data, (MEAN3, STD3), 16, train=True, cutout=3, padding_mode="reflect", device="cuda")
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)
