"RISE, LIME and Occlusion (saliency_lab.methods.perturbation): Captum conformance, direct computations, properties."
import copy, math
import numpy as np, pandas as pd, pytest, torch, torch.nn as nn
from saliency_lab import cli
from saliency_lab import segments as S
from saliency_lab.methods import perturbation as P
from saliency_lab.methods.base import METHODS

EMBEDDED = ["shapes/resnet_s", "shapes/vgg_s"]


def rel_err(a, b):
    "max |a − b| / max |b| per batch."
    return ((a - b).abs().max() / b.abs().max()).item()


def model_and_images(name, embedded, request, shapes_batch, n=2, size=None):
    model = request.getfixturevalue(name) if name == "resnet18" else embedded[name]
    x, y, _ = shapes_batch
    x = x[:n]
    if size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return model, x, y[:n]


# ---------------------------------------------------------------- Occlusion = Captum's Occlusion
OCC_SETTINGS = [
    dict(window=15, stride=8),                                         # the defaults; last window cut off at the border
    dict(window=(20, 13), stride=(10, 7), baseline=0.5),              # non-square window and stride
    dict(window=(16, 9), stride=(16, 4), softmax=True,
         baseline=torch.tensor([0.2, 0.5, 0.9])[:, None, None]),        # per-channel baseline, probabilities
]


@pytest.mark.parametrize("kw", OCC_SETTINGS, ids=["defaults", "rect", "softmax-colour"])
@pytest.mark.parametrize("name", EMBEDDED + ["resnet18"])
def test_occlusion_equals_captum(name, kw, embedded, request, shapes_batch):
    import captum.attr as ca
    model, x, y = model_and_images(name, embedded, request, shapes_batch, size=48 if name == "resnet18" else None)
    kw = dict(kw)
    wh, ww = (kw["window"],) * 2 if isinstance(kw["window"], int) else kw["window"]
    sh, sw = (kw["stride"],) * 2 if isinstance(kw["stride"], int) else kw["stride"]
    ours = P.Occlusion(model, batch_size=24, **kw)(x, y)                # passes of 24 (image, window) pairs cut across images
    fwd = (lambda z: model(z).softmax(-1)) if kw.get("softmax") else model
    ref = ca.Occlusion(fwd).attribute(x, sliding_window_shapes=(3, wh, ww), strides=(3, sh, sw),
                                      baselines=kw.get("baseline", 0.0), target=y, perturbations_per_eval=12)
    assert ours.shape == (len(x), 1, *x.shape[2:]) and ref.shape == x.shape
    for ch in range(3):                                                 # Captum: the same map in every channel
        assert rel_err(ours[:, 0], ref[:, ch]) < 1e-5                   # measured: ≤ 3e-7 (float32 forward rounding)


def test_occlusion_equals_captum_float64(embedded, shapes_batch):
    "In float64 the only difference left is Captum's final float32 division."
    import captum.attr as ca
    model = copy.deepcopy(embedded["shapes/vgg_s"]).double()
    x, y, _ = shapes_batch
    x, y = x[2:4].double(), y[2:4]
    ours = P.Occlusion(model, window=16, stride=10, batch_size=7)(x, y)
    ref = ca.Occlusion(model).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 10, 10), target=y,
                                        perturbations_per_eval=5)
    assert ours.dtype == torch.float64
    assert rel_err(ours[:, 0].float(), ref[:, 0]) < 1e-6                # measured: ~6e-8


def test_occlusion_single_pixel_windows_of_a_linear_model():
    "Window 1, stride 1: each pixel's drop when it alone is set to the baseline; for a linear model Σ_c w_c (x_c − b_c)."
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, 4)).eval()
    x = torch.rand(2, 3, 6, 5)
    base = torch.tensor([0.1, 0.4, 0.8])[:, None, None]
    a = P.Occlusion(lin, window=1, stride=1, baseline=base, batch_size=7)(x, torch.tensor([1, 3]))
    w = lin[1].weight.view(4, 3, 6, 5)
    torch.testing.assert_close(a[:, 0], ((w[[1, 3]] * (x - base)).sum(1)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- RISE
def test_rise_masks_follow_the_rise_recipe():
    "Grid cells ceil(H/s), bilinear upsampling to (s+1)·cell with skimage (mode='reflect', as RISE's code), crop at the shift."
    from skimage.transform import resize
    size, s = (50, 37), 5
    grid, shift = P.rise_grids(6, size, s=s, p1=0.3, seed=4)
    masks = P.rise_masks(6, size, s=s, p1=0.3, seed=4, dtype=torch.float64)
    cell = (math.ceil(50 / s), math.ceil(37 / s))
    assert grid.shape == (6, s, s) and shift.shape == (6, 2)
    assert (shift[:, 0] < cell[0]).all() and (shift[:, 1] < cell[1]).all() and (shift >= 0).all()
    for i in range(6):
        up = resize(grid[i].numpy().astype(np.float64), ((s + 1) * cell[0], (s + 1) * cell[1]), order=1, mode="reflect",
                    anti_aliasing=False)
        ref = up[shift[i, 0]:shift[i, 0] + 50, shift[i, 1]:shift[i, 1] + 37]
        np.testing.assert_allclose(masks[i, 0].numpy(), ref, atol=1e-12)


def direct_rise(model, x, target, masks, p1, softmax=True):
    "RISE written plainly: for each image and mask, f(x ⊙ M)_c M, summed, divided by N·p1."
    out = torch.zeros(len(x), 1, *x.shape[2:], dtype=torch.float64)
    with torch.no_grad():
        for j in range(len(x)):
            for m in masks:
                logits = model(x[j:j + 1] * m)
                p = logits.softmax(-1) if softmax else logits
                out[j, 0] += p[0, int(target[j])].double() * m[0].double()
    return out / (len(masks) * p1)


@pytest.mark.parametrize("softmax, p1", [(True, 0.5), (False, 0.3)])
def test_rise_with_fixed_masks_equals_direct_computation(softmax, p1, embedded, shapes_batch):
    model = embedded["shapes/resnet_s"]
    x, y, _ = shapes_batch
    x, y = x[:3], y[:3]
    masks = torch.rand(10, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = P.RISE(model, masks=masks, p1=p1, softmax=softmax, batch_size=4)(x, y)   # passes of 4 pairs: 3 images × 10 masks
    ref = direct_rise(model, x, y, masks, p1, softmax)
    assert ours.shape == (3, 1, 64, 64)
    assert rel_err(ours.double(), ref) < 1e-5                        # measured: ~1e-7


def test_rise_random_masks_are_the_seeded_mask_set(embedded, shapes_batch):
    "RISE(seed) uses exactly rise_masks(n_masks, size, seed=seed); another seed gives another map."
    model = embedded["shapes/vgg_s"]
    x, y, _ = shapes_batch
    x, y = x[:2], y[:2]
    a = P.RISE(model, n_masks=12, seed=5, batch_size=16)(x, y)
    b = P.RISE(model, masks=P.rise_masks(12, (64, 64), seed=5), batch_size=16)(x, y)
    assert rel_err(a, b) < 1e-6
    c = P.RISE(model, n_masks=12, seed=6, batch_size=16)(x, y)
    assert rel_err(a, c) > 1e-2


# ---------------------------------------------------------------- LIME
class CellModel(nn.Module):
    "Two logits: `scale · (statistic of one 4×4-grid cell's pixels − offset)` and 0; the statistic is the mean or the std."
    def __init__(self, cell, grid=4, size=32, stat="std", scale=20.0):
        super().__init__()
        h = size // grid
        r, c = divmod(cell, grid)
        self.sl = (slice(r * h, (r + 1) * h), slice(c * h, (c + 1) * h))
        self.stat, self.scale, self.offset = stat, scale, 0.05 if stat == "std" else 0.4
        self.register_buffer("dummy", torch.zeros(1))
    def forward(self, x):
        p = x[:, :, self.sl[0], self.sl[1]].flatten(1)
        v = p.std(1) if self.stat == "std" else p.mean(1)
        return torch.stack([self.scale * (v - self.offset), torch.zeros_like(v)], 1)


def cell_images(n, cell, seed=0, grid=4, size=32):
    "Random images, darker (values in [0, 0.5]) except the known cell (values in [0.5, 1])."
    x = 0.5 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    h = size // grid
    r, c = divmod(cell, grid)
    x[:, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 0.5
    return x


@pytest.mark.parametrize("cell", [5, 14])
@pytest.mark.parametrize("stat, fill", [("std", "segment_mean"), ("mean", 0.0), ("std", "blur"), ("mean", "image_mean")])
def test_lime_ranks_the_segment_the_model_reads_first(cell, stat, fill):
    x = cell_images(3, cell, seed=cell)
    model = CellModel(cell, stat=stat).eval()
    e = P.LIME(model, segmentation="grid", fill=fill, n_samples=128, batch_size=100).explain(x, 0)
    assert e.weights.shape == (3, 16) and (e.n_segments == 16).all()
    assert (e.weights.argmax(1) == cell).all(), e.weights
    others = torch.cat([e.weights[:, :cell], e.weights[:, cell + 1:]], 1)
    assert (e.weights[:, cell] > 10 * others.abs().amax(1)).all()      # the other segments barely matter
    seg = S.grid_segments(x)
    assert torch.equal(e.attribution[:, 0], torch.stack([e.weights[j][seg[j]] for j in range(3)]))


def test_lime_k_lasso_keeps_only_the_known_segment():
    x = cell_images(2, 9, seed=1)
    e = P.LIME(CellModel(9).eval(), segmentation="grid", num_features=1, n_samples=128, batch_size=64).explain(x, 0)
    assert (e.weights != 0).sum(1).tolist() == [1, 1] and (e.weights.argmax(1) == 9).all()


def test_lime_with_slic_ranks_the_segment_of_a_textured_square_first():
    "SLIC finds the textured square on a flat background; the model reads the square's contrast."
    g = torch.Generator().manual_seed(3)
    x = torch.full((1, 3, 48, 48), 0.3)
    x[:, 0, 8:24, 24:40] = 0.6 + 0.4 * torch.rand(16, 16, generator=g)
    x[:, 1:, 8:24, 24:40] = 0.1
    class SquareContrast(nn.Module):
        def forward(self, z):
            v = z[:, 0, 10:22, 26:38].flatten(1).std(1)
            return torch.stack([30 * (v - 0.05), torch.zeros_like(v)], 1)
    ex = P.LIME(SquareContrast().eval(), n_segments=16, n_samples=128, batch_size=64)
    e = ex.explain(x, 0)
    top = e.weights[0].argmax()
    assert (e.segments[0][10:22, 26:38] == top).float().mean() > 0.9    # the top segment is the square
    assert 4 <= int(e.n_segments[0]) <= 30


def test_weighted_ridge_equals_sklearn():
    from sklearn.linear_model import Ridge
    g = torch.Generator().manual_seed(0)
    Z = (torch.rand(3, 200, 7, generator=g) < 0.5).double()
    y = torch.rand(3, 200, generator=g, dtype=torch.float64)
    w = torch.rand(3, 200, generator=g, dtype=torch.float64)
    active = torch.ones(3, 7, dtype=torch.bool)
    active[1, [2, 5]] = False                                          # an image with fewer segments / unselected ones
    active[2, 6] = False
    for alpha in (1.0, 0.01):
        coef, b, r2 = P.weighted_ridge(Z, y, w, alpha, active)
        for j in range(3):
            cols = active[j].nonzero()[:, 0].numpy()
            ref = Ridge(alpha=alpha).fit(Z[j][:, cols].numpy(), y[j].numpy(), sample_weight=w[j].numpy())
            np.testing.assert_allclose(coef[j, cols].numpy(), ref.coef_, rtol=1e-9, atol=1e-12)
            assert (coef[j, ~active[j]] == 0).all()
            np.testing.assert_allclose(b[j].item(), ref.intercept_, rtol=1e-9)
            np.testing.assert_allclose(r2[j].item(), ref.score(Z[j][:, cols].numpy(), y[j].numpy(), sample_weight=w[j].numpy()),
                                       rtol=1e-9)


def test_lime_kernel_is_lime_exponential_cosine_kernel():
    from sklearn.metrics import pairwise_distances
    z = (torch.rand(50, 9, generator=torch.Generator().manual_seed(2)) < 0.5).int()
    z[0] = 1
    z[1] = 0
    d = pairwise_distances(z.numpy(), np.ones((1, 9)), metric="cosine").ravel()
    ref = np.sqrt(np.exp(-(d ** 2) / 0.25 ** 2))
    np.testing.assert_allclose(P.lime_kernel(z, 9, 0.25).numpy(), ref, rtol=1e-12)


def test_lime_samples_are_seeded_and_shared():
    ex = P.LIME(CellModel(0).eval(), n_samples=40, seed=3)
    s = ex.samples(11)
    assert s.shape == (40, 11) and s[0].all() and 0.35 < s[1:].float().mean() < 0.65
    assert torch.equal(s, P.LIME(CellModel(0).eval(), n_samples=40, seed=3).samples(11))
    assert not torch.equal(s, P.LIME(CellModel(0).eval(), n_samples=40, seed=4).samples(11))


def test_lime_explanation_over_chunks(embedded, shapes_batch):
    "explain() pads the segment weights of chunks with different numbers of segments; zero beyond n_segments."
    model = embedded["shapes/resnet_s"]
    x, y, _ = shapes_batch
    x, y = x[:5], y[:5]
    full = P.LIME(model, n_samples=12, batch_size=64).explain(x, y)
    parts = P.LIME(model, n_samples=12, batch_size=2).explain(x, y)     # image chunks of 2, 2, 1
    K = int(full.n_segments.max())
    assert full.weights.shape == parts.weights.shape == (5, K)
    assert full.segments.shape == (5, 64, 64) and full.intercept.shape == full.score.shape == (5,)
    for j in range(5):
        assert (full.weights[j, int(full.n_segments[j]):] == 0).all()
    assert torch.equal(full.segments, parts.segments) and torch.equal(full.n_segments, parts.n_segments)
    assert rel_err(parts.weights, full.weights) < 1e-4


def test_segment_helpers(shapes_batch):
    x = shapes_batch[0][:3]
    g = S.grid_segments(x, (3, 5))
    assert g.shape == (3, 64, 64) and g.unique().tolist() == list(range(15))
    assert g[0, 0, 0] == 0 and g[0, 0, 63] == 4 and g[0, 63, 0] == 10
    s16, s64 = S.slic_segments(x, 16), S.slic_segments(x, 64)
    for s in (s16, s64):
        assert s.shape == (3, 64, 64) and s.dtype == torch.long
        assert all(si.unique().tolist() == list(range(int(si.max()) + 1)) for si in s)
    assert (s64.flatten(1).amax(1) > s16.flatten(1).amax(1)).all()
    gray = S.slic_segments(x[:, :1], 8)
    assert gray.shape == (3, 64, 64)
    lab = P.LIME(CellModel(0).eval(), segmentation=lambda z: 7 * S.grid_segments(z, (2, 2)) + 3).segment(x)
    assert lab.unique().tolist() == [0, 1, 2, 3]                       # a callable's labels are renumbered


# ---------------------------------------------------------------- properties
FAST = {"rise": (P.RISE, dict(n_masks=12)), "lime": (P.LIME, dict(n_samples=12)),
        "occlusion": (P.Occlusion, dict(window=24, stride=20))}


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("name", EMBEDDED)
def test_batch_invariance_and_determinism(method, name, embedded, shapes_batch):
    "Alone or in a batch, in passes that cut across images or not: the same map up to float32 forward rounding."
    cls, kw = FAST[method]
    model = embedded[name]
    x, y, _ = shapes_batch
    x, y = x[:3], y[:3]
    full = cls(model, batch_size=7, **kw)(x, y)
    assert torch.equal(cls(model, batch_size=7, **kw)(x, y), full)
    assert full.shape == (3, 1, 64, 64) and torch.isfinite(full).all()
    for j in (0, 2):
        alone = cls(model, batch_size=5, **kw)(x[j:j + 1], y[j:j + 1])
        assert rel_err(alone[0], full[j]) < 1e-4                       # measured: 0 (RISE, LIME) to 4e-7 (Occlusion)


@pytest.mark.parametrize("method", FAST)
def test_batch_invariance_float64(method, embedded, shapes_batch):
    cls, kw = FAST[method]
    model = copy.deepcopy(embedded["shapes/vgg_s"]).double()
    x, y, _ = shapes_batch
    x, y = x[3:5].double(), y[3:5]
    full = cls(model, batch_size=5, **kw)(x, y)
    alone = torch.cat([cls(model, batch_size=3, **kw)(x[j:j + 1], y[j:j + 1]) for j in range(2)])
    assert full.dtype == torch.float64 and rel_err(alone, full) < 1e-10


@pytest.mark.parametrize("method", FAST)
def test_progress_bar(method, embedded, shapes_batch, capsys):
    cls, kw = FAST[method]
    x, y, _ = shapes_batch
    cls(embedded["shapes/resnet_s"], progress=True, batch_size=16, **kw)(x[:1], y[:1])
    assert {"rise": "RISE", "lime": "LIME", "occlusion": "Occlusion"}[method] in capsys.readouterr().err
    cls(embedded["shapes/resnet_s"], batch_size=16, **kw)(x[:1], y[:1])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cls, kw, msg", [
    (P.RISE, dict(n_masks=0), "n_masks must be"), (P.RISE, dict(n_masks=2.5), "n_masks must be"),
    (P.RISE, dict(s=1), "s must be an integer ≥ 2"), (P.RISE, dict(p1=0.0), "p1"), (P.RISE, dict(p1=1.5), "p1"),
    (P.RISE, dict(masks=torch.ones(3, 2, 8, 8)), "masks must have shape"), (P.RISE, dict(masks=-torch.ones(3, 8, 8)), "[0, 1]"),
    (P.RISE, dict(masks=np.ones((3, 8, 8))), "masks must be a float tensor"), (P.RISE, dict(batch_size=0), "batch_size"),
    (P.LIME, dict(segmentation="felzenszwalb"), "segmentation must be"), (P.LIME, dict(n_samples=1), "n_samples must be"),
    (P.LIME, dict(n_segments=0), "n_segments must be"), (P.LIME, dict(grid=(4, 0)), "grid must be"),
    (P.LIME, dict(kernel_width=-1), "kernel_width"), (P.LIME, dict(alpha=-1.0), "alpha"),
    (P.LIME, dict(fill="zero"), "fill must be one of"), (P.LIME, dict(num_features=0), "num_features must be"),
    (P.Occlusion, dict(window=0), "window must be"), (P.Occlusion, dict(stride=(2, 0)), "stride must be"),
    (P.Occlusion, dict(window=(3, 3, 3)), "pair"), (P.Occlusion, dict(baseline="black"), "baseline must be"),
    (P.Occlusion, dict(baseline=torch.zeros(2, 3, 8, 8)), "baseline must be one image"),
    (P.Occlusion, dict(layer="layer4"), "takes no layer"),
])
def test_bad_arguments_raise(cls, kw, msg, embedded):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        cls(embedded["shapes/resnet_s"], **kw)


def test_bad_arguments_at_call_time(embedded, shapes_batch):
    model = embedded["shapes/resnet_s"]
    x, y, _ = shapes_batch
    x, y = x[:1], y[:1]
    cases = [(P.RISE(model, masks=torch.rand(4, 1, 32, 32)), "fixed masks are"),
             (P.Occlusion(model, window=65), "larger than the image"),
             (P.Occlusion(model, window=10, stride=11), "leave pixels uncovered"),
             (P.Occlusion(model, baseline=torch.zeros(2, 1, 1)), "does not broadcast"),
             (P.LIME(model, segmentation=lambda z: torch.zeros(1, 8, 8, dtype=torch.long)), "segmentation callable"),
             (P.LIME(model, fill=torch.zeros(5, 1, 1), n_samples=4), "does not broadcast"),
             (P.RISE(model, n_masks=2), "must lie in"), (P.LIME(model, n_samples=4), "rank 4")]
    for i, (ex, msg) in enumerate(cases):
        xi = x * 2 if msg == "must lie in" else (x[0] if msg == "rank 4" else x)
        with pytest.raises(ValueError, match=msg):
            ex(xi, y)
    with pytest.raises(ValueError, match="target"):
        P.Occlusion(model, window=32, stride=32)(x, torch.tensor([0, 1]))


def test_registered():
    assert METHODS["rise"] is P.RISE and METHODS["lime"] is P.LIME and METHODS["occlusion"] is P.Occlusion


# ---------------------------------------------------------------- the benchmark notebook
def test_papermill_smoke_benchmark_perturbation(tmp_path):
    "The benchmark runs end to end with one image and tiny sample counts, and writes one timing row per method."
    out = tmp_path / "figs"
    cli.reproduce("quick", only="benchmark_perturbation", out_root=out, progress=False,
                  params={"n_images": 1, "batch_size": 16, "repeats": 1, "n_masks": 8, "n_samples": 8, "window": 32, "stride": 32})
    t = pd.read_csv(out / "benchmark_perturbation" / "timing.csv")
    assert t["method"].tolist() == ["RISE", "LIME", "Occlusion"]
    assert (t["ours (ms/image)"] > 0).all() and (t["raw forward (ms/image)"] > 0).all()
    assert np.allclose(t["ours / raw forward"], t["ours (ms/image)"] / t["raw forward (ms/image)"], rtol=1e-2)
    assert t.loc[t.method == "RISE", "Captum (ms/image)"].isna().all() and (t.loc[t.method != "RISE", "Captum (ms/image)"] > 0).all()
    assert t["forward passes / image"].tolist() == [8, 8, 5]
    assert "Benchmark: perturbation methods vs Captum" in (out / "INDEX.md").read_text()
