"""saliency_lab.metrics.fidelity beyond AD/AI/AG (those are in test_metrics.py): local accuracy, binarised AD,
selectivity, completeness, monotonicity (Arya; Nguyen & Martínez), AOPC and ADCC.

Quantus 0.6.0 is the reference for completeness, monotonicity and AOPC. Quantus normalises explanations per batch
by default; every Quantus metric here runs with `normalise=False, abs=False` so it sees exactly our inputs, and
with a deterministic numeric baseline `perturb_baseline=0.0` (Quantus' "black" is each image's minimum, ours 0)."""
import warnings
import numpy as np, pytest, torch, torch.nn as nn
from saliency_lab.core import to_saliency
from saliency_lab.metrics import fidelity as fd

quantus = pytest.importorskip("quantus")


# ---------------------------------------------------------------- small models with known outputs

class PixelModel(nn.Module):
    "Logits (4·x[0,0,0], 0): p(class 0) = σ(4v) for the top-left red value v."
    def forward(self, x): return torch.stack([x[:, 0, 0, 0] * 4, torch.zeros(len(x), device=x.device)], 1)


class Linear(nn.Module):
    "Logits are a fixed linear function of the pixels."
    def __init__(self, d, k=4, seed=0, positive=False):
        super().__init__()
        w = torch.randn(d, k, generator=torch.Generator().manual_seed(seed))
        if positive: w[:, 0] = w[:, 0].abs() * 1e-3; w[:, 1:] = 0   # class 0 rises with every pixel, unsaturated
        self.w = nn.Parameter(w)
    def forward(self, x): return x.flatten(1) @ self.w


def softmax_np(z):
    z = z - z.max(1, keepdims=True); e = np.exp(z); return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def resnet(embedded):
    return embedded["shapes/resnet_s"]


@pytest.fixture(scope="module")
def eight(shapes_batch):
    x, y, _ = shapes_batch
    return x[:8], y[:8]


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def q_call(metric, model, x, y, a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=np.asarray(y), a_batch=a.numpy(),
                                 device="cpu", **kw), dtype=float)


# ---------------------------------------------------------------- local accuracy, binarised AD, selectivity

def test_local_accuracy_binarised_ad_and_selectivity_by_hand():
    m = PixelModel().eval()
    v = torch.tensor([0.5, 0.8, 0.2, 0.9])
    x = v.view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    # maps over 2×2 pixels; the model only sees the top-left one
    s = torch.tensor([[[0.3, 0.1], [0.9, 0.5]], [[1.0, 0.2], [0.4, 0.0]], [[0.1, 0.2], [0.3, 0.4]], [[0.7, 0.2], [0.7, 0.6]]])
    p = torch.sigmoid(4 * v)
    # local accuracy: |σ(4v) − σ(4 v s00)|
    o = torch.sigmoid(4 * v * s[:, 0, 0])
    torch.testing.assert_close(fd.local_accuracy(m, x, s, 0), (p - o).abs())
    torch.testing.assert_close(fd.local_accuracy(m, x, s, 1), (p - o).abs())   # two classes: same |Δ|
    # binarised at the 50th percentile (np.percentile, linear): top-left kept iff above the median of its map
    keep = torch.tensor([np.float32(s[i, 0, 0]) > np.percentile(s[i].numpy(), 50) for i in range(4)]).float()
    assert keep.tolist() == [0.0, 1.0, 0.0, 1.0]           # 0.3 < median 0.4; 1.0 > 0.3; 0.1 < 0.25; 0.7 (tied top) > 0.65
    ob = torch.sigmoid(4 * v * keep)
    torch.testing.assert_close(fd.binarized_average_drop(m, x, s, 0), (p - ob).clamp(min=0) / p)
    torch.testing.assert_close(fd.average_drop(m, x, s, 0, percentile=50), (p - ob).clamp(min=0) / p)
    # 75th percentile of map 3 is 0.7 (tied): nothing strictly above it survives
    assert fd.binarize_map(s[3:], 75).sum() == 0
    torch.testing.assert_close(fd.binarize_map(s, 0).sum((1, 2)), torch.tensor([3., 3., 3., 3.]))   # all but the minimum
    torch.testing.assert_close(fd.binarize_map(s, 60).sum((1, 2)), torch.tensor([2., 2., 2., 2.]))
    # selectivity: the top-left value raised to α
    for a in (0.1, 0.5, 2.0, 5.0):
        oa = torch.sigmoid(4 * v * s[:, 0, 0] ** a)
        torch.testing.assert_close(fd.average_drop(m, x, s, 0, alpha=a), (p - oa).clamp(min=0) / p)
        torch.testing.assert_close(fd.average_gain(m, x, s, 1, alpha=a), ((1 - oa) - (1 - p)).clamp(min=0) / (1 - (1 - p)))
        torch.testing.assert_close(fd.average_increase(m, x, s, 1, alpha=a), ((1 - p) < (1 - oa)).float())
    cm = fd.classification_metrics(m, x, s, 0, alpha=2.0, percentile=None)
    torch.testing.assert_close(cm["average_drop"], fd.average_drop(m, x, fd.selective_map(s, 2.0), 0))


def test_binarised_ad_on_linear_model_matches_numpy():
    x = rand(6, 3, 5, 5, seed=1); s = rand(6, 5, 5, seed=2); t = torch.tensor([0, 1, 2, 3, 0, 1])
    m = Linear(75).eval()
    for q in (50, 70, 90):
        thr = np.percentile(s.numpy().reshape(6, -1), q, axis=1)
        b = (s.numpy().reshape(6, -1) > thr[:, None]).astype(np.float64)
        X = x.numpy().reshape(6, -1).astype(np.float64); B = np.repeat(b.reshape(6, 1, 25), 3, 1).reshape(6, -1)
        W = m.w.detach().double().numpy()
        pp = softmax_np(X @ W)[np.arange(6), t]; oo = softmax_np((X * B) @ W)[np.arange(6), t]
        np.testing.assert_allclose(fd.binarized_average_drop(m, x, s, t, percentile=q).numpy(),
                                   np.maximum(pp - oo, 0) / pp, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- completeness

def test_completeness_against_quantus(resnet, eight):
    x, y = eight
    recorded = []
    def output_func(d):          # Quantus compares Σa with output_func(f(x) − f(baseline)); record that difference
        recorded.append(np.array(d, dtype=np.float64)); return d
    metric = quantus.Completeness(abs=False, normalise=False, perturb_baseline=0.0, output_func=output_func,
                                  disable_warnings=True)
    attr = rand(8, 3, 64, 64, seed=3) - 0.5
    ref = q_call(metric, resnet, x, y, attr)                      # softmax=False: Quantus' default, and ours
    ours = fd.completeness(resnet, x, attr, y)
    np.testing.assert_array_equal(ours.numpy(), ref)
    assert (ref == 0).all()
    delta_q = recorded[-1]
    delta_ours = (attr.flatten(1).sum(1).double() - fd.completeness_gap(resnet, x, attr, y).double()).numpy()
    np.testing.assert_allclose(delta_ours, delta_q, rtol=1e-4, atol=1e-4)
    # an attribution whose sum is exactly Quantus' Δf: complete for Quantus, and for us within float noise.
    # (C channels: with a one-channel attribution Quantus 0.6.0 sets only the first H·W entries — channel 0 — to
    # the baseline, so its f(baseline) would be that of an image with only its red channel black.)
    exact = torch.zeros(8, 3, 64, 64); exact[:, 0, 10, 10] = torch.from_numpy(delta_q.astype(np.float32))
    recorded.clear()
    assert (q_call(metric, resnet, x, y, exact) == 1).all()
    assert (fd.completeness(resnet, x, exact, y, atol=1e-4) == 1).all()
    assert fd.completeness_gap(resnet, x, exact, y).abs().max() < 1e-4


def test_completeness_by_hand_and_baselines():
    m = Linear(12, k=3).eval()
    x = rand(5, 3, 2, 2, seed=4)
    w1 = m.w[:, 1].detach().view(1, 3, 2, 2)
    for base, xb in [(0.0, torch.zeros_like(x)), ("white", torch.ones_like(x)), ("mean", x.mean((1, 2, 3), keepdim=True).expand_as(x)),
                     (torch.full((3, 2, 2), 0.3), torch.full_like(x, 0.3))]:
        a = (x - xb) * w1                                          # exact for a linear model
        gap = fd.completeness_gap(m, x, a, 1, baseline=base)
        assert gap.abs().max() < 1e-5
        assert (fd.completeness(m, x, a, 1, baseline=base, atol=1e-5) == 1).all()
        assert (fd.completeness(m, x, a + 0.01, 1, baseline=base, atol=1e-5) == 0).all()
    # softmax output: Δ of probabilities
    a = torch.zeros(5, 1, 2, 2); p = torch.softmax(m(x), 1)[:, 1]; p0 = torch.softmax(m(torch.zeros_like(x)), 1)[:, 1]
    torch.testing.assert_close(fd.completeness_gap(m, x, a, 1, softmax=True), -(p - p0).detach())


# ---------------------------------------------------------------- monotonicity (Arya)

def insert_from(x):
    "A deterministic Quantus perturb_func that *inserts* the image's values at the indices (Arya's procedure);"
    # Quantus 0.6.0's default replaces them by the baseline on an all-baseline image, which never changes it.
    xf = x.numpy().reshape(len(x), -1)
    def f(arr, indices, **kw):
        out = arr.copy(); r = np.arange(len(arr))[:, None]; out[r, indices] = xf[r, indices]; return out
    return f


def test_monotonicity_arya_against_quantus(resnet, eight):
    x, y = eight
    m = Linear(3 * 64 * 64, k=2, positive=True).eval()
    attr = rand(8, 3, 64, 64, seed=5)
    t = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
    scores = {}
    for name, model, target, k in [("linear", m, t, 1024), ("resnet", resnet, y, 512)]:
        metric = quantus.Monotonicity(features_in_step=k, abs=False, normalise=False, perturb_baseline=0.0,
                                      perturb_func=insert_from(x), disable_warnings=True)
        ref = q_call(metric, model, x, target, attr, softmax=True)
        ours = fd.monotonicity_arya(model, x, attr, target, features_in_step=k, batch_size=7)
        np.testing.assert_array_equal(ours.numpy(), ref)
        scores[name] = ours
    # class 0 of the positive linear model rises with every inserted pixel, class 1 falls: both outcomes occur
    np.testing.assert_array_equal(scores["linear"].numpy(), (t == 0).float().numpy())


def test_monotonicity_arya_curve_by_hand():
    m = PixelModel().eval()
    x = rand(3, 3, 2, 2, seed=6)
    attr = torch.tensor([[[4., 3], [2, 1]], [[1., 2], [3, 4]], [[2., 1], [4, 3]]])      # top-left ranks last / first / 2nd
    score, curve = fd.monotonicity_arya(m, x, attr, 0, features_in_step=1, return_curve=True)
    assert curve.shape == (3, 5)
    # the model sees only the top-left value: the probability jumps when it is inserted
    v = x[:, 0, 0, 0]; lo, hi = torch.sigmoid(torch.zeros(3)), torch.sigmoid(4 * v)
    step_in = torch.tensor([4, 1, 2])
    expect = torch.stack([torch.where(torch.arange(5) >= step_in[i], hi[i], lo[i]) for i in range(3)])
    torch.testing.assert_close(curve, expect)
    assert (score == 1).all()
    # class 1 falls when the pixel comes in — except for image 1, where it comes in at step 1: like Quantus, the
    # test starts after the first group, not at the baseline
    torch.testing.assert_close(fd.monotonicity_arya(m, x, attr, 1), torch.tensor([0., 1., 0.]))


# ---------------------------------------------------------------- monotonicity (Nguyen & Martínez)

@pytest.mark.parametrize("k", [256, 1024])
def test_monotonicity_nguyen_against_quantus(resnet, eight, k):
    x, y = eight
    attr = rand(8, 3, 64, 64, seed=7)
    attr[:4] = attr[:4] * x[:4]                                   # some structure, still without ties
    metric = quantus.MonotonicityCorrelation(features_in_step=k, nr_samples=1, abs=False, normalise=False,
                                             perturb_baseline=0.0, disable_warnings=True)
    ref = q_call(metric, resnet, x, y, attr, softmax=True)
    ours = fd.monotonicity_nguyen(resnet, x, attr, y, features_in_step=k, baseline=0.0, batch_size=50)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)     # measured: ≤ 3e-8
    assert np.ptp(ref) > 0.05


def test_monotonicity_nguyen_by_hand():
    "Linear model, logits: perturbing group G to 0 changes the logit by −Σ_G w x; softmax=False: v = (Σ_G w x)² / f²."
    m = Linear(12, k=2).eval()
    x = rand(4, 3, 2, 2, seed=8)
    attr = rand(4, 3, 2, 2, seed=9)
    score, atts, var = fd.monotonicity_nguyen(m, x, attr, 0, features_in_step=3, baseline=0.0, softmax=False,
                                              return_curve=True)
    w = m.w[:, 0].detach().double().numpy(); X = x.double().numpy().reshape(4, -1); A = attr.double().numpy().reshape(4, -1)
    from scipy.stats import spearmanr
    for i in range(4):
        order = np.argsort(A[i], kind="stable"); groups = order.reshape(4, 3)
        f = X[i] @ w
        v = np.array([(X[i, g] @ w[g]) ** 2 for g in groups]) / f ** 2
        np.testing.assert_allclose(var[i].numpy(), v, rtol=1e-4)
        np.testing.assert_allclose(atts[i].numpy(), A[i, groups].sum(1), rtol=1e-6)
        np.testing.assert_allclose(score[i].item(), spearmanr(A[i, groups].sum(1), v)[0], atol=1e-5)


def test_monotonicity_nguyen_uniform_is_seeded_and_batch_invariant(resnet, eight):
    x, y = eight
    attr = rand(4, 64, 64, seed=10)
    full = fd.monotonicity_nguyen(resnet, x[:4], attr, y[:4], features_in_step=512, nr_samples=3, seed=1)
    torch.testing.assert_close(fd.monotonicity_nguyen(resnet, x[2:3], attr[2:3], y[2:3], features_in_step=512,
                                                      nr_samples=3, seed=1, batch_size=5), full[2:3])
    torch.testing.assert_close(fd.monotonicity_nguyen(resnet, x[:4], attr, y[:4], features_in_step=512, nr_samples=3,
                                                      seed=1, batch_size=13), full)
    other = fd.monotonicity_nguyen(resnet, x[:4], attr, y[:4], features_in_step=512, nr_samples=3, seed=2)
    assert not torch.equal(other, full)


def test_rankdata_matches_scipy():
    from scipy.stats import rankdata
    a = torch.tensor([[3., 1, 3, 2, 1, 5], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(fd.average_ranks(a).numpy(), rankdata(a.numpy(), axis=1))


# ---------------------------------------------------------------- AOPC

@pytest.mark.parametrize("order,patch,regions", [("morf", 14, 10), ("lerf", 14, 10), ("morf", 16, 16), ("morf", 9, 30), ("lerf", 13, 20)])
def test_aopc_matches_quantus_region_perturbation(resnet, eight, order, patch, regions):
    x, y = eight
    sal = rand(8, 64, 64, seed=11)
    metric = quantus.RegionPerturbation(patch_size=patch, regions_evaluation=regions, order=order, abs=False,
                                        normalise=False, perturb_baseline=0.0, disable_warnings=True)
    ref = q_call(metric, resnet, x, y, sal[:, None], softmax=True)          # [B, regions]: f(x) − f(x^(k)), k = 1..L
    score, curve = fd.aopc(resnet, x, sal, y, patch_size=patch, regions=regions, order=order, batch_size=17,
                           return_curve=True)
    assert curve.shape == (8, regions + 1) and (curve[:, 0] == 0).all()
    np.testing.assert_allclose(curve[:, 1:].numpy(), ref, atol=1e-6)     # measured: identical
    np.testing.assert_allclose(score.numpy(), ref.sum(1) / (regions + 1), atol=1e-6)   # Samek et al.'s AOPC


def test_aopc_by_hand_and_multichannel():
    m = PixelModel().eval()
    x = rand(2, 3, 4, 4, seed=12) * 0.5 + 0.5
    sal = torch.zeros(2, 4, 4)
    sal[0, :2, :2] = 1.0                 # the patch that holds the top-left pixel is most relevant
    sal[1, 2:, 2:] = 1.0; sal[1, :2, 2:] = 0.5; sal[1, 2:, :2] = 0.25   # ... or least relevant
    score, curve = fd.aopc(m, x, sal, 0, patch_size=2, regions=4, return_curve=True)
    p = torch.sigmoid(4 * x[:, 0, 0, 0]); drop = p - 0.5
    torch.testing.assert_close(curve[0], torch.stack([torch.tensor(0.)] + [drop[0]] * 4))
    torch.testing.assert_close(curve[1], torch.tensor([0., 0, 0, 0, drop[1]]))
    torch.testing.assert_close(score, curve.mean(1))
    # a C-channel attribution is ranked by its channel sum, like the map of that sum
    a3 = torch.stack([sal, sal * 0.5, sal * 0.25], 1)
    torch.testing.assert_close(fd.aopc(m, x, a3, 0, patch_size=2, regions=4), score)


def test_aopc_and_monotonicity_are_batch_invariant(resnet, eight):
    x, y = eight
    sal = rand(8, 64, 64, seed=13)
    full = fd.aopc(resnet, x, sal, y, batch_size=64)
    torch.testing.assert_close(fd.aopc(resnet, x[5:6], sal[5:6], y[5:6]), full[5:6], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fd.aopc(resnet, x, sal, y, batch_size=3), full, atol=1e-6, rtol=1e-5)
    s, c = fd.monotonicity_arya(resnet, x, sal, y, features_in_step=256, return_curve=True, batch_size=64)
    s1, c1 = fd.monotonicity_arya(resnet, x[3:4], sal[3:4], y[3:4], features_in_step=256, return_curve=True, batch_size=5)
    torch.testing.assert_close(c1, c[3:4], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- ADCC

def mean_explainer(x, t):
    "A gradient-free 'explainer': the channel mean of the image, as a [B, 1, H, W] attribution."
    return x.mean(1, keepdim=True)


def test_adcc_by_hand():
    m = Linear(48, k=3).eval()
    x = rand(5, 3, 4, 4, seed=14); t = torch.tensor([0, 1, 2, 0, 1])
    sal = to_saliency(mean_explainer(x, t))
    X = x.double().numpy(); S = sal.double().numpy()
    # coherency: Pearson between the map and the min-max-normalised channel mean of x ⊙ sal, mapped to (r + 1) / 2
    M2 = (X * S[:, None]).mean(1)
    M2 = (M2 - M2.min((1, 2), keepdims=True)) / (M2.max((1, 2), keepdims=True) - M2.min((1, 2), keepdims=True))
    r = np.array([np.corrcoef(S[i].ravel(), M2[i].ravel())[0, 1] for i in range(5)])
    ch = fd.coherency(m, x, sal, t, mean_explainer)
    np.testing.assert_allclose(ch.numpy(), (r + 1) / 2, rtol=1e-5)
    np.testing.assert_allclose(fd.coherency(m, x, sal, t, mean_explainer, rescale=False).numpy(), r, rtol=1e-5)
    cp = S.reshape(5, -1).sum(1) / 16
    np.testing.assert_allclose(fd.adcc_complexity(sal).numpy(), cp, rtol=1e-6)
    W = m.w.detach().double().numpy(); Xf = X.reshape(5, -1)
    pp = softmax_np(Xf @ W)[np.arange(5), t]
    oo = softmax_np((X * S[:, None]).reshape(5, -1) @ W)[np.arange(5), t]
    ad = np.maximum(pp - oo, 0) / pp
    expect = 3 / (2 / (r + 1) + 1 / (1 - cp) + 1 / (1 - ad))
    parts = fd.adcc(m, x, sal, t, mean_explainer, return_parts=True)
    np.testing.assert_allclose(parts["adcc"].numpy(), expect, rtol=1e-4)
    np.testing.assert_allclose(parts["average_drop"].numpy(), ad, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fd.adcc(m, x, sal, t, mean_explainer, batch_size=2).numpy(), expect, rtol=1e-4)
    # a constant map has no correlation: coherency and ADCC are NaN
    assert fd.coherency(m, x, torch.ones(5, 4, 4), t, mean_explainer).isnan().all()
    assert fd.adcc(m, x, torch.ones(5, 4, 4), t, mean_explainer).isnan().all()


def test_adcc_with_gradcam_batch_invariant(resnet, eight):
    from saliency_lab.methods import create
    x, y = eight
    gc = create("gradcam", resnet)
    sal = to_saliency(gc(x, y))
    full = fd.adcc(resnet, x, sal, y, gc, return_parts=True)
    one = fd.adcc(resnet, x[2:3], sal[2:3], y[2:3], gc)
    torch.testing.assert_close(one, full["adcc"][2:3], atol=1e-5, rtol=1e-4)
    assert ((full["adcc"] >= 0) & (full["adcc"] <= 1)).all()
    assert ((full["coherency"] > 0.5) & (full["coherency"] <= 1)).all()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,msg", [
    (lambda m, x, s: fd.binarized_average_drop(m, x, s, 0, percentile=100), "percentile"),
    (lambda m, x, s: fd.average_drop(m, x, s, 0, alpha=-1), "alpha"),
    (lambda m, x, s: fd.local_accuracy(m, x, s[:2], 0), "shape"),
    (lambda m, x, s: fd.completeness(m, x, torch.zeros(3, 2, 4, 4), 0), "shape"),
    (lambda m, x, s: fd.completeness(m, x, torch.full((3, 1, 4, 4), float("nan")), 0), "NaN"),
    (lambda m, x, s: fd.completeness(m, x, s, 0, baseline="gray"), "baseline"),
    (lambda m, x, s: fd.completeness(m, x, s, 0, baseline=torch.zeros(2, 4, 4)), "broadcastable"),
    (lambda m, x, s: fd.monotonicity_arya(m, x, s, 0, features_in_step=0), "features_in_step"),
    (lambda m, x, s: fd.monotonicity_arya(m, x, s, 0, features_in_step=17), "exceeds"),
    (lambda m, x, s: fd.monotonicity_nguyen(m, x, s, 0, nr_samples=0), "nr_samples"),
    (lambda m, x, s: fd.monotonicity_nguyen(m, x, s, [0, 1], features_in_step=4), "target"),
    (lambda m, x, s: fd.aopc(m, x, s, 0, patch_size=2, regions=5), "regions"),
    (lambda m, x, s: fd.aopc(m, x, s, 0, patch_size=5), "patch_size"),
    (lambda m, x, s: fd.aopc(m, x, s, 0, patch_size=2, regions=2, order="best"), "order"),
    (lambda m, x, s: fd.coherency(m, x, s, 0, explainer="gradcam"), "explainer"),
    (lambda m, x, s: fd.adcc(m, x, s * 2, 0, mean_explainer), "[0, 1]"),
    (lambda m, x, s: fd.adcc(m, x, s, 0, lambda xx, tt: xx[:, :, :2]), "shape"),
])
def test_bad_input(call, msg):
    m = PixelModel().eval()
    x = rand(3, 3, 4, 4, seed=15); s = rand(3, 4, 4, seed=16)
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(m, x, s)


def test_model_in_train_mode_is_rejected():
    m = PixelModel().train()
    with pytest.raises(ValueError, match="train mode"):
        fd.aopc(m, rand(1, 3, 4, 4), rand(1, 4, 4), 0, patch_size=2, regions=2)
