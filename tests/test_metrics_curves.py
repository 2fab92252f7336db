import math
from contextlib import contextmanager

import numpy as np, pytest, torch, torch.nn as nn
import torchvision.transforms.functional as TF

from saliency_lab import attacks, core
from saliency_lab.metrics.curves import (auc, curve_monotonicity, curve_smoothness, deletion_curve,
                                         insertion_curve, perturbation_curve, summarize)

STEPS = 24        # does not divide 64·64 = 4096: exercises the uneven step sizes


@pytest.fixture(scope="module")
def setup(shapes_batch, embedded):
    x, y, _ = shapes_batch
    x = x[:3]
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(3, 64, 64, generator=g)
    sal[0] = (sal[0] * 4).floor() / 4          # many ties: checks the stable tie-break
    sal[2] = TF.gaussian_blur(sal[2][None, None], [15, 15], [6.0, 6.0])[0, 0]
    sal[2] = (sal[2] - sal[2].min()) / (sal[2].max() - sal[2].min())
    model = embedded["shapes/resnet_s"]
    t = core.resolve_target(model, x, "pred")
    return model, x, sal, t


# ---------------------------------------------------------------- a plain reference, one image, one step at a time
def ref_order(s, order, region):
    H, W = s.shape
    v = s.flatten().tolist()
    pix = sorted(range(H * W), key=lambda p: (-v[p], p))
    if order == "pixel":
        return pix
    cells = {}
    for p in range(H * W):
        cells.setdefault((p // W) // region * 1000 + (p % W) // region, []).append(p)
    keys = sorted(cells)                                                   # raster order of cells
    mean = {k: sum(v[p] for p in cells[k]) / len(cells[k]) for k in keys}
    ranked = sorted(keys, key=lambda k: (-mean[k], keys.index(k)))
    pos = {p: i for i, p in enumerate(pix)}
    return [p for k in ranked for p in sorted(cells[k], key=lambda p: pos[p])]


def ref_baseline(model, x, name, seed=0):
    if name == "zero": return torch.zeros_like(x)
    if name == "mean": return model.mean.view(1, -1, 1, 1).expand_as(x).clone()
    if name == "uniform":
        g = torch.Generator().manual_seed(seed)
        return torch.rand((1, *x.shape[1:]), generator=g).expand_as(x).clone()
    if name == "blur": return TF.gaussian_blur(x, [11, 11], [5.0, 5.0])
    raise KeyError(name)


def ref_curve(model, x, sal, t, steps, base, kind, order="pixel", region=9):
    out = []
    for b in range(len(x)):
        C, H, W = x[b].shape
        N = H * W
        pixels = ref_order(sal[b], order, region)
        start, finish = (x[b], base[b]) if kind == "deletion" else (base[b], x[b])
        row = []
        for s in range(steps + 1):
            img = start.clone().view(C, N)
            n = math.ceil(s * N / steps)
            idx = torch.tensor(pixels[:n], dtype=torch.long)
            img[:, idx] = finish.reshape(C, N)[:, idx]
            with torch.no_grad():
                row.append(model(img.view(1, C, H, W)).softmax(-1)[0, t[b]].item())
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("baseline", ["zero", "mean", "uniform", "blur"])
@pytest.mark.parametrize("kind", ["insertion", "deletion"])
def test_curves_equal_plain_reference(setup, baseline, kind):
    model, x, sal, t = setup
    fn = insertion_curve if kind == "insertion" else deletion_curve
    got = fn(model, x, sal, t, steps=STEPS, baseline=baseline, batch_size=16, seed=0)
    want = ref_curve(model, x, sal, t, STEPS, ref_baseline(model, x, baseline), kind)
    assert got.shape == (3, STEPS + 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("baseline, kind", [("mean", "deletion"), ("blur", "insertion"), ("uniform", "deletion")])
def test_region_order_equals_plain_reference(setup, baseline, kind):
    model, x, sal, t = setup
    fn = insertion_curve if kind == "insertion" else deletion_curve
    got = fn(model, x, sal, t, steps=STEPS, baseline=baseline, order="region", region=9, batch_size=20)
    want = ref_curve(model, x, sal, t, STEPS, ref_baseline(model, x, baseline), kind, "region", 9)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the region order really differs from the pixel order on a noisy map
    pix = fn(model, x, sal, t, steps=STEPS, baseline=baseline)
    assert (pix[1] - got[1]).abs().max() > 1e-3


def test_tensor_and_callable_baselines(setup):
    model, x, sal, t = setup
    grey = torch.tensor([0.2, 0.5, 0.8])
    got = deletion_curve(model, x, sal, t, steps=8, baseline=grey)
    want = ref_curve(model, x, sal, t, 8, grey.view(1, 3, 1, 1).expand_as(x), "deletion")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    flip = lambda z: z.flip(-1)
    got = insertion_curve(model, x, sal, t, steps=8, baseline=flip)
    torch.testing.assert_close(got, ref_curve(model, x, sal, t, 8, x.flip(-1), "insertion"), atol=2e-5, rtol=1e-4)


def test_endpoints_and_logits(setup):
    model, x, sal, t = setup
    p = core.predict(model, x, target=t, softmax=True)
    d = deletion_curve(model, x, sal, t, steps=8, baseline="zero")
    i = insertion_curve(model, x, sal, t, steps=8, baseline="zero")
    torch.testing.assert_close(d[:, 0], p); torch.testing.assert_close(i[:, -1], p)
    torch.testing.assert_close(d[:, -1], i[:, 0])           # both: the all-black image
    lg = deletion_curve(model, x, sal, t, steps=8, baseline="zero", softmax=False)
    torch.testing.assert_close(lg[:, 0], core.predict(model, x, target=t))


# ---------------------------------------------------------------- TorchCAM 0.5.0 DeletionInsertionMetric
class _FixedCAM:
    "The minimal CAM-extractor protocol TorchCAM's metric uses, returning a given map."
    def __init__(self, model, cam): self.model, self.cam = model, cam
    def __call__(self, class_idx=None, scores=None, **kw): return [self.cam]
    def fuse_cams(self, cams): return cams[0]
    @contextmanager
    def _hooks_off(self): yield


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_torchcam_deletion_insertion_agree(setup, baseline):
    from torchcam.metrics import DeletionInsertionMetric
    model, x, sal, t = setup
    steps = 16                                  # divides 4096: TorchCAM's fractions are then uniform, like ours
    base = ref_baseline(model, x, baseline)
    ours_d = auc(deletion_curve(model, x, sal, t, steps=steps, baseline=baseline))
    ours_i = auc(insertion_curve(model, x, sal, t, steps=steps, baseline=baseline))
    for b in range(len(x)):                     # one image per update: per-image AUCs from the running sums
        m = DeletionInsertionMetric(_FixedCAM(model, sal[b:b + 1]), lambda z: z.softmax(-1), steps=steps,
                                    baseline=base[b:b + 1], batch_size=7)
        m.update(x[b:b + 1], class_idx=[int(t[b])])
        s = m.summary()
        assert s["deletion_auc"] == pytest.approx(float(ours_d[b]), abs=2e-5)
        assert s["insertion_auc"] == pytest.approx(float(ours_i[b]), abs=2e-5)


# ---------------------------------------------------------------- Quantus 0.6.0 PixelFlipping (deletion to black)
def test_quantus_pixel_flipping_agrees():
    import quantus
    torch.manual_seed(0)
    # one channel, so Quantus' features (C·H·W) are pixels and its features_in_step (must divide H·W) counts pixels
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    x = torch.rand(4, 1, 16, 16); sal = torch.rand(4, 16, 16); t = torch.tensor([0, 1, 2, 3])
    ours = deletion_curve(model, x, sal, t, steps=32, baseline="zero")
    # Quantus "black" is the image minimum; a number is used as is
    pf = quantus.PixelFlipping(features_in_step=8, perturb_baseline=0.0, normalise=False, abs=False,
                               disable_warnings=True)
    q = np.array(pf(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=sal[:, None].numpy(),
                    device="cpu", softmax=True))
    # Quantus records after each step only (no unperturbed point); continuous maps have no ties
    np.testing.assert_allclose(ours[:, 1:].numpy(), q, atol=2e-6)


# ---------------------------------------------------------------- auc
def test_auc_equals_numpy_trapezoid():
    rng = np.random.default_rng(0)
    curves = [rng.random(n) for n in (2, 3, 17, 225)] + [np.array([1.0, 0.0, 0.0, 0.0]), np.linspace(0, 1, 11) ** 2]
    for c in curves:
        want = np.trapezoid(c, np.linspace(0, 1, len(c)))
        assert float(auc(torch.tensor(c))) == pytest.approx(want, abs=1e-12)
    batch = torch.tensor(rng.random((5, 9)))
    np.testing.assert_allclose(auc(batch).numpy(), np.trapezoid(batch.numpy(), np.linspace(0, 1, 9), axis=1))
    with pytest.raises(ValueError, match="n ≥ 2"):
        auc(torch.tensor([0.3]))


# ---------------------------------------------------------------- batch invariance, determinism
def test_batch_invariance_and_determinism(setup):
    model, x, sal, t = setup
    kw = dict(steps=STEPS, baseline="uniform", seed=5)
    full = insertion_curve(model, x, sal, t, batch_size=64, **kw)
    torch.testing.assert_close(insertion_curve(model, x[1:2], sal[1:2], t[1:2], **kw), full[1:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(insertion_curve(model, x, sal, t, batch_size=7, **kw), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(insertion_curve(model, x.flip(0), sal.flip(0), t.flip(0), batch_size=5, **kw),
                               full.flip(0), atol=1e-6, rtol=0)
    assert torch.equal(insertion_curve(model, x, sal, t, batch_size=64, **kw), full)      # same seed: identical
    other = insertion_curve(model, x, sal, t, steps=STEPS, baseline="uniform", seed=6)
    assert (other[:, 0] - full[:, 0]).abs().max() > 1e-4                                     # another seed: other noise


# ---------------------------------------------------------------- Perturb (001)
@pytest.mark.parametrize("name", ["shapes/resnet_s", "shapes/vgg_s"])
def test_perturbation_curve_endpoints_and_failures(shapes_batch, embedded, name):
    model = embedded[name]
    x = shapes_batch[0]
    sal = torch.rand(len(x), 64, 64, generator=torch.Generator().manual_seed(1))
    curve, res = perturbation_curve(model, x, sal, "pred", steps=16, return_attack=True)
    assert curve.shape == (len(x), 17)
    clean = core.predict(model, x).argmax(1)
    adv_pred = core.predict(model, res.x_adv).argmax(1)
    ok = adv_pred != clean
    assert ok.any() and (~ok).any(), "the fixture should mix successful and failed attacks"
    assert torch.equal(torch.isnan(curve).all(1), ~ok) and not torch.isnan(curve[ok]).any()
    # the attacked image is on the 8-bit grid, one level from the image's own 8-bit value
    assert torch.allclose(res.x_adv * 255, (res.x_adv * 255).round(), atol=1e-3)
    assert ((res.x_adv - (x * 255).round() / 255).abs() * 255).round().max() == 1
    torch.testing.assert_close(curve[ok, 0], core.predict(model, res.x_adv[ok], target=clean[ok], softmax=True))
    torch.testing.assert_close(curve[ok, -1], core.predict(model, x[ok], target=clean[ok], softmax=True))
    s = summarize(auc(curve))
    assert s["skipped"] == int((~ok).sum()) and s["n"] == int(ok.sum())
    assert s["mean"] == pytest.approx(float(auc(curve[ok]).mean()), abs=1e-6)
    # the middle equals an insertion curve whose baseline is the attacked image
    ins = insertion_curve(model, x[ok], sal[ok], clean[ok], steps=16, baseline=res.x_adv[ok])
    torch.testing.assert_close(curve[ok], ins)


def test_perturbation_curve_pgd_attacks_at_least_as_many(shapes_batch, embedded):
    model = embedded["shapes/vgg_s"]
    x = shapes_batch[0]
    sal = torch.rand(len(x), 64, 64, generator=torch.Generator().manual_seed(2))
    f = perturbation_curve(model, x, sal, "pred", steps=4)
    p = perturbation_curve(model, x, sal, "pred", steps=4, attack="pgd")
    nf, np_ = (~torch.isnan(f[:, 0])).sum(), (~torch.isnan(p[:, 0])).sum()
    assert np_ >= nf and np_ > 0


# ---------------------------------------------------------------- monotonicity and smoothness (001 §4.1)
def test_monotonicity_and_smoothness_hand_curves():
    c = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.6, 0.9],      # Δ = .2, 0, −.1, .4, .3
                      [0.9, 0.8, 0.85, 0.4, 0.4, 0.1]])    # Δ = −.1, .05, −.45, 0, −.3
    torch.testing.assert_close(curve_monotonicity(c), torch.tensor([4 / 5, 2 / 5]))
    torch.testing.assert_close(curve_monotonicity(c, decreasing=True), torch.tensor([2 / 5, 4 / 5]))
    for row in c.double().numpy():
        d = np.diff(row)
        want = np.sqrt(((d - d.mean()) ** 2).sum()) / (len(row) - 1)
        assert float(curve_smoothness(torch.tensor(row))) == pytest.approx(want, abs=1e-12)
    assert float(curve_smoothness(torch.linspace(1, 0, 50))) == pytest.approx(0, abs=1e-7)
    nan = torch.tensor([[0.1, float("nan"), 0.3], [0.1, 0.2, 0.3]])
    m = curve_monotonicity(nan)
    assert torch.isnan(m[0]) and m[1] == 1.0 and torch.isnan(curve_smoothness(nan)[0])


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, msg", [
    (dict(sal=torch.rand(3, 32, 32)), "shape"),
    (dict(sal=torch.rand(3, 1, 64, 64)), "shape"),
    (dict(sal=torch.full((3, 64, 64), float("nan"))), "NaN"),
    (dict(sal=torch.rand(3, 64, 64) * 2 - 0.5), r"\[0, 1\]"),
    (dict(target=torch.tensor([0, 1])), "batch has 3"),
    (dict(baseline="black"), "unknown baseline.*'zero', 'mean', 'uniform', 'blur'"),
    (dict(order="random"), "unknown order.*'pixel', 'region'"),
    (dict(steps=0), "steps"),
    (dict(steps=5000), "exceeds"),
    (dict(baseline=torch.rand(3, 32, 32)), "broadcast"),
    (dict(baseline=torch.rand(3) + 1), r"\[0, 1\]"),
    (dict(order="region", region=0), "region"),
    (dict(batch_size=0), "batch_size"),
])
@pytest.mark.parametrize("fn", [insertion_curve, deletion_curve])
def test_bad_input(setup, fn, kw, msg):
    model, x, sal, t = setup
    args = dict(sal=sal, target=t, steps=8)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        fn(model, x, args.pop("sal"), args.pop("target"), **args)


def test_bad_input_perturbation_and_model(setup):
    model, x, sal, t = setup
    with pytest.raises(ValueError, match="unknown attack.*'fgsm', 'pgd'"):
        perturbation_curve(model, x, sal, t, attack="cw")
    with pytest.raises(ValueError, match="x must"):
        deletion_curve(model, x[0], sal, t)
    model.train()
    try:
        with pytest.raises(ValueError, match="train mode"):
            deletion_curve(model, x, sal, t, steps=4)
    finally:
        model.eval()
