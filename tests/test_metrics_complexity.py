"Sparseness, Complexity, Effective Complexity, relevance KDE (nbs/32_metrics_complexity): Quantus 0.6.0 / SciPy conformance, hand values, errors."
import math, numpy as np, pytest, torch
from saliency_lab import core
from saliency_lab.methods import create
from saliency_lab.metrics.complexity import complexity, effective_complexity, relevance_kde, sparseness


@pytest.fixture(scope="module")
def attrs(embedded, shapes_batch):
    "Maps and raw attributions of 6 embedded images: gradient (signed, 3 channels), its map, Grad-CAM's map, a thresholded map."
    model = embedded["shapes/resnet_s"]
    x, _, _ = shapes_batch
    x = x[:6]
    y = core.predict(model, x).argmax(1)
    g = create("gradient", model)(x, y)
    gc = core.to_saliency(create("gradcam", model)(x, y))
    return model, x, y, {"gradient_raw": g, "gradient_map": core.to_saliency(g), "gradcam_map": gc,
                         "gradcam_thresholded": gc * (gc > 0.5)}


QUANTUS = {"sparseness": "Sparseness", "complexity": "Complexity", "effective_complexity": "EffectiveComplexity"}
OURS = {"sparseness": sparseness, "complexity": complexity, "effective_complexity": effective_complexity}


@pytest.mark.parametrize("kind", ["gradient_raw", "gradient_map", "gradcam_map", "gradcam_thresholded"])
@pytest.mark.parametrize("metric", list(QUANTUS))
def test_matches_quantus(attrs, metric, kind):
    import quantus
    model, x, y, A = attrs
    a = A[kind]
    a_np = (a if a.ndim == 4 else a[:, None]).numpy().astype(np.float64).copy()
    # normalise=False: Quantus would otherwise divide the whole batch by its largest |a| (per batch, not per image);
    # abs=True as ours (and Quantus' default). Sparseness/Complexity are scale-invariant; EC is not, hence no rescaling.
    m = getattr(quantus, QUANTUS[metric])(normalise=False, abs=True, disable_warnings=True, display_progressbar=False)
    ref = torch.tensor(np.asarray(m(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a_np, device="cpu")),
                       dtype=torch.float64)
    ours = OURS[metric](a).double()
    assert ours.shape == (len(x),) and torch.isfinite(ours).all()
    if metric == "effective_complexity":
        assert torch.equal(ours, ref)
    else:   # Quantus adds 1e-7 to every value before the Gini index and 1e-12 inside the log
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if (metric, kind) != ("effective_complexity", "gradient_map"):   # min–max of a signed gradient: only the minimum is 0
        assert len(set(ours.tolist())) > 1   # the images differ: not a constant answer


def test_hand_values():
    H = W = 16; n = H * W
    one = torch.zeros(3, H, W); one[0, 2, 3] = 1; one[1, 15, 15] = 0.01; one[2, 0, 0] = -5
    torch.testing.assert_close(sparseness(one), torch.full((3,), 1 - 1 / n))          # the maximum
    torch.testing.assert_close(complexity(one), torch.zeros(3))
    assert effective_complexity(one).tolist() == [1, 1, 1]
    const = torch.full((2, H, W), 0.4); const[1] = -2
    torch.testing.assert_close(sparseness(const), torch.zeros(2))
    torch.testing.assert_close(complexity(const), torch.full((2,), math.log(n)))
    torch.testing.assert_close(complexity(torch.rand(2, 3, 8, 8) * 0 + 1), torch.full((2,), math.log(3 * 64)))
    # Gini of a two-valued map: k pixels at v, the rest 0 → 1 − k/n; entropy → ln k
    for k in (1, 7, 100):
        m = torch.zeros(1, n); m[0, torch.randperm(n)[:k]] = 0.3
        torch.testing.assert_close(sparseness(m.view(1, H, W)), torch.tensor([1 - k / n]))
        torch.testing.assert_close(complexity(m.view(1, H, W)), torch.tensor([math.log(k)]))
    # a direct Gini: mean absolute difference over all pairs / (2 × mean)
    r = torch.rand(1, 8, 8) ** 3
    v = r.flatten().double()
    gini = (v[:, None] - v[None]).abs().mean() / (2 * v.mean())
    torch.testing.assert_close(sparseness(r).double(), gini[None], rtol=1e-5, atol=1e-6)
    # EC threshold
    ramp = torch.linspace(0, 1, 101).view(1, 1, 101)
    assert effective_complexity(ramp, eps=0.5).item() == 50 and effective_complexity(ramp).item() == 100
    # zero map: Gini 0, entropy undefined (NaN), EC 0
    z = torch.zeros(1, 4, 4)
    assert sparseness(z).item() == 0 and complexity(z).isnan().all() and effective_complexity(z).item() == 0


def test_properties_and_batch_invariance(attrs):
    _, _, _, A = attrs
    a = A["gradcam_map"]
    for f in (sparseness, complexity, effective_complexity):
        full = f(a)
        assert full.dtype == torch.float32 and full.device == a.device
        torch.testing.assert_close(torch.cat([f(a[i:i + 1]) for i in (4, 1)]), full[[4, 1]])
    # Gini and entropy do not change with the scale or the order of the pixels
    perm = torch.randperm(a[0].numel())
    shuffled = a.flatten(1)[:, perm].view_as(a)
    torch.testing.assert_close(sparseness(3 * shuffled), sparseness(a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(complexity(3 * shuffled), complexity(a), rtol=1e-5, atol=1e-6)
    # a sharper map (thresholded) is sparser and less complex than the full Grad-CAM map
    assert (sparseness(A["gradcam_thresholded"]) > sparseness(a)).all()
    assert (complexity(A["gradcam_thresholded"]) < complexity(a)).all()


def test_relevance_kde_matches_scipy(attrs):
    from scipy.stats import gaussian_kde
    _, _, _, A = attrs
    s = A["gradcam_map"][:3]
    grid, dens = relevance_kde(s, grid=51)
    assert dens.shape == (3, 51) and torch.allclose(grid, torch.linspace(0, 1, 51))
    for i in range(3):
        ref = gaussian_kde(s[i].flatten().double().numpy())(grid.double().numpy())     # Scott's rule, per map
        np.testing.assert_allclose(dens[i].numpy(), ref, rtol=1e-4, atol=1e-6)
    # fixed bandwidth: the mean of per-image densities is the KDE of the pooled values
    h = 0.05
    _, d = relevance_kde(s, grid=grid, bandwidth=h)
    pooled = s.flatten().double().numpy()
    ref = gaussian_kde(pooled, bw_method=h / pooled.std(ddof=1))(grid.double().numpy())
    np.testing.assert_allclose(d.mean(0).numpy(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(relevance_kde(s[1:2], grid=grid)[1], dens[1:2])     # batch invariance


def test_bad_input():
    for f in (sparseness, complexity, effective_complexity):
        for bad in (np.zeros((1, 4, 4)), torch.zeros(4, 4), torch.zeros(1, 1, 1, 4, 4), torch.zeros(0, 4, 4),
                    torch.full((1, 4, 4), float("nan")), torch.full((1, 4, 4), float("inf"))):
            with pytest.raises(ValueError): f(bad)
    with pytest.raises(ValueError, match="eps"): effective_complexity(torch.rand(1, 4, 4), eps=-1)
    with pytest.raises(ValueError, match="bandwidth"): relevance_kde(torch.rand(1, 4, 4), bandwidth=0)
    with pytest.raises(ValueError, match="grid"): relevance_kde(torch.rand(1, 4, 4), grid=1)
    with pytest.raises(ValueError, match="NaN"): relevance_kde(torch.full((1, 4, 4), float("nan")))
