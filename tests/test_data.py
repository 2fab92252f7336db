import numpy as np, pytest, torch
from pathlib import Path
from PIL import Image
from saliency_lab import data


def _png(path, h=40, w=60, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def fake_imagefolder(tmp_path):
    wnids, _ = data.imagenet_classes()
    for k, c in enumerate([0, 2, 2, 999]):
        _png(tmp_path / "val" / wnids[c] / f"ILSVRC2012_val_{k + 1:08d}.png", seed=k)
    (tmp_path / "bbox" / "val").mkdir(parents=True)
    (tmp_path / "bbox" / "val" / "ILSVRC2012_val_00000002.xml").write_text(
        "<annotation><object><bndbox><xmin>6</xmin><ymin>4</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object>"
        "<object><bndbox><xmin>40</xmin><ymin>10</ymin><xmax>60</xmax><ymax>40</ymax></bndbox></object></annotation>")
    return tmp_path


def test_imagenet_imagefolder_layout(fake_imagefolder):
    ds = data.load_dataset("imagenet", root=fake_imagefolder, size=32)
    assert len(ds) == 4
    labels = [ds[i][1] for i in range(4)]
    assert labels == [0, 2, 2, 999]
    x, y, meta = ds[1]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(meta["boxes"], torch.tensor([[6 * 32 / 60, 4 * 32 / 40, 30 * 32 / 60, 20 * 32 / 40],
                                                            [40 * 32 / 60, 10 * 32 / 40, 32.0, 32.0]]))
    assert meta["mask"].sum() > 0 and meta["id"] == "ILSVRC2012_val_00000002"
    assert ds[0][2]["boxes"].shape == (0, 4)
    # the pixels are the file's pixels, resized
    raw = torch.from_numpy(np.asarray(Image.open(ds.files[0][0]), dtype=np.float32) / 255).permute(2, 0, 1)
    assert abs(float(x.mean()) - float(ds[1][0].mean())) < 0.5 and raw.shape == (3, 40, 60)


def test_imagenet_subsets_and_n(fake_imagefolder):
    assert len(data.load_dataset("imagenet", root=fake_imagefolder, size=16, subset="coherency100")) == 2   # class 2 is in it
    rnd = data.imagenet_subset("random1000")
    assert len(rnd) == 1000 and len(data.imagenet_subset("coherency100")) == 100
    ds = data.load_dataset("imagenet", root=fake_imagefolder, size=16, n=2, seed=1)
    assert len(ds) == 2
    assert [f for f, _ in ds.files] == [f for f, _ in data.load_dataset("imagenet", root=fake_imagefolder, size=16, n=2, seed=1).files]


def test_imagenet_center_crop_moves_boxes(fake_imagefolder):
    ds = data.load_dataset("imagenet", root=fake_imagefolder, size=32, resize="center_crop")
    x, _, meta = ds[1]
    assert x.shape == (3, 32, 32)
    b = meta["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 32).all() and len(b) >= 1


def test_imagenet_flat_layout_with_solution_csv(tmp_path):
    wnids, _ = data.imagenet_classes()
    for k in range(3): _png(tmp_path / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG", seed=k)
    rows = ["ImageId,PredictionString", f"ILSVRC2012_val_00000001,{wnids[5]} 1 2 30 20",
            f"ILSVRC2012_val_00000002,{wnids[7]} 0 0 10 10 {wnids[7]} 20 20 50 30", f"ILSVRC2012_val_00000003,{wnids[9]} 5 5 6 6"]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    ds = data.load_dataset("imagenet", root=tmp_path, size=60)
    assert [ds[i][1] for i in range(3)] == [5, 7, 9]
    assert ds[1][2]["boxes"].shape == (2, 4)


def test_imagenet_flat_layout_with_label_file(tmp_path):
    for k in range(2): _png(tmp_path / "val" / f"img{k}.png", seed=k)
    (tmp_path / "val_labels.txt").write_text("img0 n01440764\nimg1 17\n")
    ds = data.load_dataset("imagenet", root=tmp_path, size=8)
    assert [ds[i][1] for i in range(2)] == [0, 17]


def test_imagenet_missing_folder_and_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="root/val/<wnid>"):
        data.load_dataset("imagenet", root=tmp_path / "nope")
    _png(tmp_path / "val" / "a.png")
    with pytest.raises(FileNotFoundError, match="no label file"):
        data.load_dataset("imagenet", root=tmp_path)


def test_synthetic_sets_are_deterministic_and_prefix_stable():
    for name in ("shapes", "textures", "shapes_context"):
        a = data.load_batch(data.load_dataset(name, n=10))
        b = data.load_batch(data.load_dataset(name, n=4))
        assert torch.equal(a[0][:4], b[0]) and torch.equal(a[1][:4], b[1])
        assert not torch.equal(a[0], data.load_batch(data.load_dataset(name, n=10, seed=1))[0])
        x, y, metas = a
        for i in range(10):
            m = metas[i]["mask"]; (x0, y0, x1, y1) = metas[i]["boxes"][0].long().tolist()
            assert m.any() and m[:, :x0].sum() == 0 and m[:y0].sum() == 0 and m[y1:].sum() == 0 and m[:, x1:].sum() == 0


def test_classes_are_balanced_enough_and_splits_differ():
    ds = data.load_dataset("shapes", split="train", n=800)
    y = np.array([ds[i][1] for i in range(800)])
    assert np.bincount(y, minlength=8).min() > 60
    assert not torch.equal(data.load_dataset("shapes", split="val")[0][0], data.load_dataset("shapes", split="test")[0][0])


def test_context_variant_predicts_class_from_background():
    x, y, metas = data.load_batch(data.load_dataset("shapes_context", n=300))
    bg = torch.stack([x[i][:, ~metas[i]["mask"]].mean(1) for i in range(300)])
    centroids = torch.stack([bg[y == c].mean(0) for c in range(8)])
    pred = torch.cdist(bg, centroids).argmin(1)
    assert (pred == y).float().mean() > 0.5        # chance is 1/8


def test_digits():
    ds = data.load_dataset("digits", split="test")
    x, y, meta = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y <= 9 and meta["mask"].any()
    assert len(data.load_dataset("digits", split="train")) == 1200


def test_unknown_dataset():
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        data.load_dataset("digit")


@pytest.mark.parametrize("kind", list(data.TRANSFORM_LEVELS))
def test_transforms(kind):
    x, _, _ = data.load_batch(data.load_dataset("shapes", n=4))
    other = x.flip(0)
    outs = [data.transform_images(x, kind, lev, other=other) for lev in range(4)]
    for o in outs: assert o.shape == x.shape and 0 <= o.min() and o.max() <= 1
    diffs = [float((o - x).abs().mean()) for o in outs]
    assert min(diffs) > 0
    if kind == "mixup":
        torch.testing.assert_close(outs[0], 0.8 * x + 0.2 * other)
        with pytest.raises(ValueError, match="other"): data.transform_images(x, "mixup")
    if kind == "rotation":
        r = data.transform_images(x, "rotation", strength=90.0)
        torch.testing.assert_close(r[..., 2:-2, 2:-2], torch.rot90(x, 1, (-2, -1))[..., 2:-2, 2:-2], atol=1e-4, rtol=0)
