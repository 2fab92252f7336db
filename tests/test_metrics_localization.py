"""Localisation metrics (saliency_lab.metrics.localization): Quantus conformance for the pointing game,
hand computations for every other metric, box/mask round trips, independent references for the
vectorised connected-component boxes, batch invariance and bad input."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from saliency_lab.core import to_saliency
from saliency_lab.methods import create
from saliency_lab.metrics.localization import (
    box_accuracy, box_iou, box_study_maps, boxes_to_mask, check_boxes, crop_boxes, energy_pointing_game,
    largest_component_boxes, localization_error, mask_to_boxes, max_box_accuracy, official_metric,
    pad_boxes, pixel_f1, pointing_game, predicted_boxes, saliency_metric)


@pytest.fixture(scope="module")
def setup(shapes_batch, embedded):
    x, y, metas = shapes_batch
    model = embedded["shapes/resnet_s"]
    boxes = [m["boxes"] for m in metas]
    mask = torch.stack([m["mask"] for m in metas])
    maps = {n: to_saliency(create(n, model)(x, y)) for n in ("gradcam", "gradient", "fakecam")}
    return model, x, y, boxes, mask, maps


class MeanModel(nn.Module):
    "Logits (4·mean(x), 0, 1): class 0 wins for bright images (mean > 1/4), class 2 for dark ones."
    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([4 * m, torch.zeros_like(m), torch.ones_like(m)], 1)


# ---------------------------------------------------------------- pointing game vs Quantus 0.6.0

def _quantus_pg(model, x, y, sal, mask):
    import quantus
    # normalise=False, abs=False: our maps are already in [0, 1]; Quantus' default max-normalisation would
    # not move the maximum anyway, but this keeps the inputs identical.
    metric = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)
    out = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=sal[:, None].numpy(),
                 s_batch=mask[:, None].numpy().astype(np.float32), device="cpu")
    return torch.tensor(np.asarray(out, dtype=np.float32))


@pytest.mark.parametrize("name", ["gradcam", "gradient", "fakecam", "gradcam_coarse"])
def test_pointing_game_matches_quantus(setup, name):
    model, x, y, boxes, mask, maps = setup
    sal = maps["gradcam"].mul(4).round().div(4) if name == "gradcam_coarse" else maps[name]   # coarse: many ties
    ours = pointing_game(sal, mask=mask)
    ref = _quantus_pg(model, x, y, sal, mask)
    assert torch.equal(ours, ref), (ours, ref)
    # the same through boxes: Quantus on the rasterised boxes
    assert torch.equal(pointing_game(sal, boxes=boxes), _quantus_pg(model, x, y, sal, boxes_to_mask(boxes, 64, 64)))


def test_pointing_game_quantus_discriminates(setup):
    "The conformance test can fail: moving every map's peak outside the object changes both."
    model, x, y, boxes, mask, maps = setup
    sal = maps["gradcam"] * 0.5
    far = torch.where(mask.flatten(1).float().argmin(1, keepdim=True) == torch.arange(64 * 64), 1.0, 0.0)
    sal = torch.maximum(sal, far.view_as(sal))           # a unit peak on the first pixel outside each object
    ours = pointing_game(sal, mask=mask)
    assert ours.sum() == 0 and torch.equal(ours, _quantus_pg(model, x, y, sal, mask))


def test_pointing_game_tolerance_against_distance_transform(setup):
    "Zhang et al.'s tolerance: a hit when a maximum lies within `tol` px (Euclidean) of the object."
    from scipy import ndimage
    model, x, y, boxes, mask, maps = setup
    for sal in (maps["gradient"], maps["gradcam"]):
        peaks = (sal == sal.amax((1, 2), keepdim=True)).numpy()
        dist = np.stack([ndimage.distance_transform_edt(~m) for m in mask.numpy()])   # distance to the object
        for tol in (0, 3, 15):
            ref = torch.tensor([(d[p] <= tol).any() for d, p in zip(dist, peaks)], dtype=torch.float32)
            assert torch.equal(pointing_game(sal, mask=mask, tolerance=tol), ref), tol
    # tolerance helps the gradient: more hits at 15 px than at 0 on this batch
    assert pointing_game(maps["gradient"], mask=mask, tolerance=15).sum() > pointing_game(maps["gradient"], mask=mask).sum()


def test_pointing_game_hand_and_empty():
    s = torch.zeros(4, 4, 4)
    s[0, 1, 1] = 1; s[1, 0, 3] = 1; s[2, 0, 0] = s[2, 3, 3] = 0.8; s[3, 2, 2] = 1
    b = [torch.tensor([[0., 0., 2., 2.]])] * 3 + [torch.zeros(0, 4)]
    out = pointing_game(s, boxes=b)
    assert torch.equal(out[:3], torch.tensor([1., 0., 1.])) and out[3].isnan()
    assert torch.equal(pointing_game(s, boxes=b, tolerance=2)[:3], torch.tensor([1., 1., 1.]))


# ---------------------------------------------------------------- energy pointing game, F1

def test_energy_pointing_game_hand():
    s = torch.tensor([[[0.2, 0.4, 0.0], [0.1, 0.0, 0.3], [0.0, 0.0, 1.0]]]).repeat(2, 1, 1)
    s[1] = 0
    m = torch.zeros(2, 3, 3, dtype=torch.bool); m[:, :2, :2] = True
    out = energy_pointing_game(s, mask=m)
    assert torch.isclose(out[0], torch.tensor(0.7 / 2.0)) and out[1].isnan()      # zero map: NaN
    # several boxes: their union; overlap counted once
    b = [torch.tensor([[0., 0., 2., 1.], [0., 0., 1., 2.], [2., 2., 3., 3.]])] * 2
    assert torch.isclose(energy_pointing_game(s, boxes=b)[0], torch.tensor(1.7 / 2.0))


def test_pixel_f1_hand():
    s = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    m = torch.zeros(1, 3, 3, dtype=torch.bool); m[0, :2, :2] = True
    P, R = 2.0 / 3.0, 2.0 / 4.0
    assert torch.isclose(pixel_f1(s, mask=m), torch.tensor([2 * P * R / (P + R)])).all()
    # binarised at 0.6: pixels {(0,0), (2,2)}: TP 1, |pred| 2, |U| 4 → F1 = 2/6
    assert torch.isclose(pixel_f1(s, mask=m, threshold=0.6), torch.tensor([2 / 6])).all()
    # mean threshold (mean = 3/9): pixels ≥ 1/3: 4 of them, 3 inside U → 2·3/(4+4)
    assert torch.isclose(pixel_f1(s, mask=m, threshold="mean"), torch.tensor([6 / 8])).all()
    assert pixel_f1(s, mask=torch.zeros_like(m)).isnan().all()
    assert pixel_f1(torch.zeros(1, 3, 3), mask=m).eq(0).all()


# ---------------------------------------------------------------- predicted boxes, LE, OM, BoxAcc

def test_predicted_boxes_and_iou_hand():
    s = torch.zeros(2, 6, 8)
    s[0, 1:4, 1:4] = 0.6; s[0, 4, 6] = 1.0        # big dim blob + small bright pixel
    s[1] = 0.3                                    # constant map: whole image under the mean rule
    pb, found = predicted_boxes(s)
    assert torch.equal(pb, torch.tensor([[1., 1., 4., 4.], [0., 0., 8., 6.]])) and found.all()
    assert torch.equal(predicted_boxes(s, component="all")[0][0], torch.tensor([1., 1., 7., 5.]))
    # diagonal neighbours: one component with 8-connectivity, two with 4
    d = torch.zeros(1, 5, 5); d[0, 0, 0] = d[0, 1, 1] = d[0, 2, 2] = 1; d[0, 4, 0] = d[0, 4, 1] = 1
    assert torch.equal(predicted_boxes(d, threshold=0.5)[0], torch.tensor([[0., 0., 3., 3.]]))
    assert torch.equal(predicted_boxes(d, threshold=0.5, connectivity=4)[0], torch.tensor([[0., 4., 2., 5.]]))
    assert torch.isclose(box_iou(torch.tensor([0., 0., 4., 4.]), torch.tensor([2., 2., 6., 6.])), torch.tensor(4 / 28))
    assert box_iou(torch.tensor([0., 0., 1., 1.]), torch.tensor([2., 2., 3., 3.])) == 0


def test_largest_component_boxes_against_skimage():
    from skimage.measure import label, regionprops
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 23, 31, generator=g) > torch.linspace(0.3, 0.8, 40)[:, None, None]
    masks[5] = False
    for conn in (4, 8):
        boxes, found = largest_component_boxes(masks, connectivity=conn)
        for i, m in enumerate(masks.numpy()):
            regs = regionprops(label(m, connectivity=1 if conn == 4 else 2))
            if not regs:
                assert not found[i]; continue
            best = max(regs, key=lambda r: (r.area, -r.label))   # most pixels; ties: first label (raster order)
            y0, x0, y1, x1 = best.bbox
            assert torch.equal(boxes[i], torch.tensor([x0, y0, x1, y1], dtype=torch.float32)), (i, conn)


def test_localization_error_hand_multiple_boxes():
    s = torch.zeros(3, 6, 6)
    s[0, :3, :3] = 1
    s[1, :2, :3] = 0.5; s[1, 5, 5] = 1
    s[2, :3, 1:4] = 1
    b = [torch.tensor([[0., 0., 3., 3.]]), torch.tensor([[0., 0., 3., 3.]]),
         torch.tensor([[4., 4., 6., 6.], [1., 0., 4., 2.]])]                   # image 2: best is the second box
    iou = torch.tensor([1., 6 / 9, 6 / 9])
    assert torch.allclose(localization_error(s, b), 1 - iou)
    assert torch.equal(localization_error(s, b, iou_threshold=0.7), torch.tensor([0., 1., 1.]))
    # a mask as ground truth: its tight box
    m = boxes_to_mask(b[:2] + [torch.tensor([[0., 0., 3., 3.]])], 6, 6)
    assert torch.allclose(localization_error(s, m), 1 - torch.tensor([1., 6 / 9, 6 / 12]))
    # a numeric threshold above the maximum: no box, IoU 0
    assert torch.equal(localization_error(s, b, threshold=1.0), torch.ones(3))
    out = localization_error(s, b[:2] + [torch.zeros(0, 4)], on_empty="nan")
    assert out[2].isnan() and not out[:2].isnan().any()


def test_official_metric_hand():
    model = MeanModel().eval()
    x = torch.zeros(3, 3, 6, 6); x[0] = 1; x[1] = 1          # images 0, 1 → class 0; image 2 → class 2
    s = torch.zeros(3, 6, 6); s[:, :3, :3] = 1; s[1, :2, :3] = 1; s[1, 2] = 0
    b = [torch.tensor([[0., 0., 3., 3.]])] * 3
    iou = torch.tensor([1., 6 / 9, 1.])
    assert torch.allclose(official_metric(model, x, s, b, target=0), torch.tensor([0., 1 - 6 / 9, 1.]))
    assert torch.allclose(official_metric(model, x, s, b, target=torch.tensor([0, 0, 2])), 1 - iou)
    assert torch.equal(official_metric(model, x, s, b, target=0, iou_threshold=0.5), torch.tensor([0., 0., 1.]))
    assert torch.equal(official_metric(model, x, s, b, target=0, iou_threshold=0.7), torch.tensor([0., 1., 1.]))
    assert torch.allclose(official_metric(model, x, s, b, target=0, batch_size=1),
                          official_metric(model, x, s, b, target=0))


def test_box_accuracy_hand():
    s = torch.zeros(3, 6, 6)
    s[0, :3, :3] = 1
    s[1, :2, :3] = 0.5; s[1, 5, 5] = 1
    s[2, :3, 1:4] = 1
    b = [torch.tensor([[0., 0., 3., 3.]])] * 3
    hits = box_accuracy(s, b, thresholds=[0.0, 0.6, 1.0], iou_thresholds=[0.5, 0.7])
    assert hits.shape == (3, 3, 2)
    assert torch.equal(hits[:, 0], torch.tensor([[1., 1.], [1., 0.], [1., 0.]]))
    assert torch.equal(hits[:, 1], torch.tensor([[1., 1.], [0., 0.], [1., 0.]]))
    assert torch.equal(hits[:, 2], torch.zeros(3, 2))                          # nothing is > 1
    assert torch.allclose(max_box_accuracy(hits, reduce=False), torch.tensor([1., 1 / 3]))
    assert torch.isclose(max_box_accuracy(hits), torch.tensor(2 / 3))
    assert box_accuracy(s, b).shape == (3, 100, 3)                             # defaults: η grid 0.01, δ 0.3/0.5/0.7


def test_box_accuracy_against_per_image_reference(setup):
    "Vectorised BoxAcc = a plain per-image, per-threshold loop with skimage labels and regionprops."
    from skimage.measure import label, regionprops
    model, x, y, boxes, mask, maps = setup
    th, dl = [0.1, 0.3, 0.5, 0.7], [0.3, 0.5, 0.7]
    for name in ("gradcam", "gradient"):
        sal = maps[name]
        hits = box_accuracy(sal, boxes, thresholds=th, iou_thresholds=dl, batch_size=5)
        for i in range(len(sal)):
            for j, t in enumerate(th):
                regs = regionprops(label((sal[i] > t).numpy(), connectivity=2))
                best = max(regs, key=lambda r: (r.area, -r.label))
                y0, x0, y1, x1 = best.bbox
                gx0, gy0, gx1, gy1 = boxes[i][0].tolist()
                inter = max(0, min(x1, gx1) - max(x0, gx0)) * max(0, min(y1, gy1) - max(y0, gy0))
                iou = inter / ((x1 - x0) * (y1 - y0) + (gx1 - gx0) * (gy1 - gy0) - inter)
                assert torch.equal(hits[i, j], torch.tensor([float(iou >= d) for d in dl])), (name, i, t)


# ---------------------------------------------------------------- saliency metric

def test_crop_boxes_equals_crop_then_interpolate():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 10, 12, generator=g)
    b = torch.tensor([[0., 0., 12., 10.], [2., 3., 7., 5.], [11., 9., 12., 10.]])
    out = crop_boxes(x, b)
    for i, (x0, y0, x1, y1) in enumerate(b.long().tolist()):
        ref = F.interpolate(x[i:i + 1, :, y0:y1, x0:x1], size=(10, 12), mode="bilinear", align_corners=False)
        assert torch.allclose(out[i], ref[0], atol=1e-5), i
    assert torch.allclose(crop_boxes(x, b, size=(4, 6))[0], F.interpolate(x[:1], size=(4, 6), mode="bilinear")[0], atol=1e-5)


def test_saliency_metric_hand():
    model = MeanModel().eval()
    x = torch.zeros(4, 3, 8, 8); x[..., :4] = 1             # left half white, right half black
    s = torch.zeros(4, 8, 8)
    s[0, :, :4] = 1                                        # left half → white crop, area 1/2
    s[1, :2, :2] = 1                                       # 2×2 corner → white crop, area 1/16
    s[2, 5, 6] = 1                                         # one black pixel → black crop, area 1/64 → 0.05
    s[3, :, 2:6] = 1                                       # straddles: crop of mean 1/2, area 1/2
    def p0(v):                                             # softmax of (4v, 0, 1) for class 0
        z = torch.stack([4 * v, torch.zeros_like(v), torch.ones_like(v)], -1)
        return z.softmax(-1)[..., 0]
    mean3 = crop_boxes(x[3:], torch.tensor([[2., 0., 6., 8.]])).mean()
    p = p0(torch.tensor([1., 1., 0., mean3.item()]))
    a = torch.tensor([0.5, 1 / 16, 0.05, 0.5])
    assert torch.allclose(saliency_metric(model, x, s, 0), a.log() - p.log(), atol=1e-6)
    assert torch.allclose(saliency_metric(model, x, s, 0, batch_size=1), a.log() - p.log(), atol=1e-6)
    assert torch.allclose(saliency_metric(model, x, s, 0, min_area=0.1),
                          a.clamp(min=0.1).log() - p.log(), atol=1e-6)
    full = p0(torch.tensor(0.5))
    assert torch.allclose(saliency_metric(model, x, s, 0, crop=False), a.log() - full.log(), atol=1e-6)
    assert saliency_metric(model, x, s, 0, threshold=1.0).isnan().all()


# ---------------------------------------------------------------- helpers

def test_box_mask_round_trips():
    g = torch.Generator().manual_seed(2)
    H, W = 20, 30
    xy0 = torch.stack([torch.randint(0, W - 1, (50,), generator=g), torch.randint(0, H - 1, (50,), generator=g)], 1)
    wh = torch.stack([torch.randint(1, W, (50,), generator=g), torch.randint(1, H, (50,), generator=g)], 1)
    xy1 = torch.minimum(xy0 + wh, torch.tensor([W, H]))
    boxes = [torch.cat([xy0[i], xy1[i]]).float()[None] for i in range(50)]
    m = boxes_to_mask(boxes, H, W)
    assert torch.equal(m.sum((1, 2)), (xy1 - xy0).prod(1))
    back = mask_to_boxes(m)
    assert all(torch.equal(a, b) for a, b in zip(back, boxes))
    assert torch.equal(boxes_to_mask(back, H, W), m)
    # several disjoint boxes per image: components recover them (sorted by first pixel in raster order)
    multi = [torch.tensor([[0., 0., 3., 2.], [5., 1., 8., 4.], [1., 6., 2., 9.]]), torch.zeros(0, 4)]
    mm = boxes_to_mask(multi, 10, 10)
    comp = mask_to_boxes(mm, components=True)
    assert torch.equal(comp[0], multi[0]) and comp[1].shape == (0, 4)
    assert torch.equal(mask_to_boxes(mm)[0], torch.tensor([[0., 0., 8., 9.]]))
    # float boxes rasterise by rounding, like data.ImageNetVal
    assert boxes_to_mask([torch.tensor([[0.6, 1.4, 3.4, 3.6]])], 5, 5)[0].nonzero().tolist() == \
        [[1, 1], [1, 2], [2, 1], [2, 2], [3, 1], [3, 2]]
    bx, valid = pad_boxes(multi)
    assert bx.shape == (2, 3, 4) and valid.tolist() == [[True] * 3, [False] * 3] and torch.equal(bx[0], multi[0])
    # tensor forms
    assert len(check_boxes(torch.zeros(4, 4), 4, 5, 5)) == 4 and check_boxes(torch.zeros(2, 3, 4), 2, 5, 5)[1].shape == (3, 4)


def test_box_study_maps_hand():
    s = torch.tensor([[[0.2, 0.9], [0.5, 1.0]]])
    st = box_study_maps(s, boxes=[torch.tensor([[1., 0., 2., 2.]])])
    assert torch.equal(st["B"], torch.tensor([[[0., 1.], [0., 1.]]]))
    assert torch.equal(st["I-B"], torch.tensor([[[1., 0.], [1., 0.]]]))
    assert torch.allclose(st["B&S"], torch.tensor([[[0., 0.9], [0., 1.0]]]))
    assert torch.allclose(st["S-B"], torch.tensor([[[0.2, 0.], [0.5, 0.]]]))


def test_batch_invariance(setup):
    model, x, y, boxes, mask, maps = setup
    sal = maps["gradcam"]
    full = {
        "sp": pointing_game(sal, mask=mask, tolerance=15), "ep": energy_pointing_game(sal, boxes=boxes),
        "f1": pixel_f1(sal, boxes=boxes), "le": localization_error(sal, boxes),
        "om": official_metric(model, x, sal, boxes, y), "sm": saliency_metric(model, x, sal, y),
        "ba": box_accuracy(sal, boxes, thresholds=[0.2, 0.5]),
    }
    for i in (0, 5, 11):
        one = {
            "sp": pointing_game(sal[i:i + 1], mask=mask[i:i + 1], tolerance=15),
            "ep": energy_pointing_game(sal[i:i + 1], boxes=boxes[i:i + 1]),
            "f1": pixel_f1(sal[i:i + 1], boxes=boxes[i:i + 1]), "le": localization_error(sal[i:i + 1], boxes[i:i + 1]),
            "om": official_metric(model, x[i:i + 1], sal[i:i + 1], boxes[i:i + 1], y[i:i + 1]),
            "sm": saliency_metric(model, x[i:i + 1], sal[i:i + 1], y[i:i + 1]),
            "ba": box_accuracy(sal[i:i + 1], boxes[i:i + 1], thresholds=[0.2, 0.5]),
        }
        for k in full:
            assert torch.allclose(full[k][i], one[k][0], atol=1e-5), (k, i)
    # sanity on the real batch: Grad-CAM localises better than the gradient on these shapes
    assert energy_pointing_game(sal, boxes=boxes).mean() > energy_pointing_game(maps["gradient"], boxes=boxes).mean()


def test_bad_input(setup):
    model, x, y, boxes, mask, maps = setup
    sal = maps["gradcam"]
    with pytest.raises(ValueError, match="shape"):
        pointing_game(sal, mask=mask[:, :32])
    with pytest.raises(ValueError, match="shape"):
        energy_pointing_game(sal, mask=mask[:5])
    with pytest.raises(ValueError, match="exactly one"):
        pointing_game(sal, mask=mask, boxes=boxes)
    with pytest.raises(ValueError, match="exactly one"):
        pixel_f1(sal)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pointing_game(sal * 2, mask=mask)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        localization_error(sal - 0.5, boxes)
    with pytest.raises(ValueError, match="NaN"):
        energy_pointing_game(sal.masked_fill(mask, float("nan")), mask=mask)
    with pytest.raises(ValueError, match="no ground-truth box"):
        localization_error(sal, boxes[:-1] + [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="no ground-truth box"):
        official_metric(model, x, sal, boxes[:-1] + [torch.zeros(0, 4)], y)
    with pytest.raises(ValueError, match="no ground-truth box"):
        box_accuracy(sal, [torch.zeros(0, 4)] * len(sal))
    with pytest.raises(ValueError, match="entries"):
        localization_error(sal, boxes[:-1])
    with pytest.raises(ValueError, match="outside the image"):
        localization_error(sal, boxes[:-1] + [torch.tensor([[0., 0., 65., 10.]])])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        pointing_game(sal, boxes=boxes[:-1] + [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="0 and 1"):
        pointing_game(sal, mask=mask.float() * 0.5)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(sal, mask=mask, tolerance=-1)
    with pytest.raises(ValueError, match="'mean'"):
        localization_error(sal, boxes, threshold="median")
    with pytest.raises(ValueError, match="'largest' or 'all'"):
        localization_error(sal, boxes, component="biggest")
    with pytest.raises(ValueError, match="connectivity"):
        localization_error(sal, boxes, connectivity=6)
    with pytest.raises(ValueError, match="iou_threshold"):
        localization_error(sal, boxes, iou_threshold=50)
    with pytest.raises(ValueError, match="on_empty"):
        localization_error(sal, boxes, on_empty="skip")
    with pytest.raises(ValueError, match="iou_thresholds"):
        box_accuracy(sal, boxes, iou_thresholds=[30, 50])
    with pytest.raises(ValueError, match="min_area"):
        saliency_metric(model, x, sal, y, min_area=0)
    with pytest.raises(ValueError, match="target"):
        official_metric(model, x, sal, boxes, y[:3])
    with pytest.raises(ValueError, match="shape"):
        saliency_metric(model, x, sal[:3], y)
    model.train()
    try:
        with pytest.raises(ValueError, match="train mode"):
            official_metric(model, x, sal, boxes, y)
    finally:
        model.eval()
    with pytest.raises(ValueError, match="hits"):
        max_box_accuracy(torch.zeros(3, 4))
