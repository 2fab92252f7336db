"Conformance of the gradient family with Captum, and its properties."
import numpy as np, pytest, torch, torch.nn as nn
from saliency_lab import core, methods
from saliency_lab.methods import gradient as G

CLOSE = dict(rtol=1e-4, atol=1e-6)


def assert_close_scaled(a, b, tol=1e-4):
    "max |a − b| ≤ tol · max |b|: float32 sums over many steps in another order differ where values are near 0."
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * scale, f"max abs difference {err:.3g} > {tol} × {scale:.3g}"


def _model(request, fixture):
    m = request.getfixturevalue(fixture)
    return m["shapes/resnet_s"] if fixture == "embedded" else m


MODELS = ["resnet18", "vgg11_bn", "embedded"]


@pytest.mark.parametrize("fixture", MODELS)
def test_simple_methods_equal_captum(fixture, request, shapes_batch):
    from captum.attr import InputXGradient, GuidedBackprop, Deconvolution
    model = _model(request, fixture)
    x, y, _ = shapes_batch
    x, y = x[:6], y[:6]
    torch.testing.assert_close(methods.create("input_x_gradient", model)(x, y),
                               InputXGradient(model).attribute(x.clone().requires_grad_(), target=y), **CLOSE)
    torch.testing.assert_close(methods.create("guided_backprop", model)(x, y),
                               GuidedBackprop(model).attribute(x.clone().requires_grad_(), target=y), **CLOSE)
    torch.testing.assert_close(methods.create("deconvnet", model)(x, y),
                               Deconvolution(model).attribute(x.clone().requires_grad_(), target=y), **CLOSE)


@pytest.mark.parametrize("rule", G.IG_METHODS)
@pytest.mark.parametrize("fixture", ["resnet18", "embedded"])
def test_integrated_gradients_equal_captum(rule, fixture, request, shapes_batch):
    from captum.attr import IntegratedGradients
    import copy
    model = _model(request, fixture)
    x, y, _ = shapes_batch
    x, y = x[:4], y[:4]
    # a constant grey baseline would put the path through exact max-pool ties, where one ulp of α
    # (float32 nodes in Captum, float64 here) changes the routing: use a random baseline image instead.
    # In float32 even a random baseline can meet a near-tie on some CPUs (one pixel off by 0.4 % of the
    # map's range), so both run in float64, where the α nodes differ by 1e-8 and no tie is hit
    model, x, y = copy.deepcopy(model).double(), x[:2].double(), y[:2]    # two images keep float64 affordable
    noise = torch.rand(1, *x.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for baseline in (None, noise):
        ours = methods.create("integrated_gradients", model, steps=16, method=rule, baseline=baseline, batch_size=7)(x, y)
        ref = IntegratedGradients(model).attribute(x, baselines=0.0 if baseline is None else baseline.expand_as(x), target=y,
                                                   n_steps=16, method=rule)
        if rule == "riemann_trapezoid":      # Captum's trapezoid weights sum to (m-1)/m, ours (the trapezoid rule) to 1
            ours = ours * 15 / 16
        assert_close_scaled(ours, ref)


class Recorder:
    "Wrap a random function and keep what it returned."
    def __init__(self, fn): self.fn, self.out = fn, []
    def __call__(self, *a, **k):
        r = self.fn(*a, **k); self.out.append(r); return r


def test_gradient_shap_equals_captum_with_the_same_draws(embedded, shapes_batch, monkeypatch):
    from captum.attr import GradientShap
    model = embedded["shapes/vgg_s"]
    x, y, _ = shapes_batch
    # random baseline images: constant ones put path points on exact max-pool ties, where Captum's
    # α·x + (1−α)·b and our b + α·(x − b) round differently and route gradients differently
    baselines = torch.rand(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    np.random.seed(0); torch.manual_seed(0)
    for i in range(3):
        normal, choice, uniform = Recorder(torch.normal), Recorder(np.random.choice), Recorder(np.random.uniform)
        with monkeypatch.context() as mp:
            mp.setattr(torch, "normal", normal); mp.setattr(np.random, "choice", choice); mp.setattr(np.random, "uniform", uniform)
            ref = GradientShap(model).attribute(x[i:i + 1], baselines=baselines, target=y[i:i + 1], n_samples=7, stdevs=0.05)
        ex = methods.create("gradient_shap", model, baselines=baselines, n_samples=7, stdevs=0.05, batch_size=3)
        noise, idx, alpha = normal.out[0], torch.tensor(choice.out[0]), torch.as_tensor(uniform.out[0], dtype=torch.float32)
        ex.draws = lambda xx, nb: (noise, idx, alpha)
        assert_close_scaled(ex(x[i:i + 1], y[i:i + 1]), ref)


@pytest.mark.parametrize("base, captum_cls, kw", [("gradient", "Saliency", {"abs": False}),
                                                  ("guided_backprop", "GuidedBackprop", {}),
                                                  ("integrated_gradients", "IntegratedGradients", {"n_steps": 8})])
@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_ensembles_equal_captum_noise_tunnel_with_the_same_noise(base, captum_cls, kw, kind, embedded, shapes_batch, monkeypatch):
    import captum.attr as ca
    model = embedded["shapes/resnet_s"]
    x, y, _ = shapes_batch
    sigma, n = 0.1, 6
    for i in (0, 7):
        normal = Recorder(torch.normal)
        with monkeypatch.context() as mp:
            mp.setattr(torch, "normal", normal)
            ref = ca.NoiseTunnel(getattr(ca, captum_cls)(model)).attribute(
                x[i:i + 1], nt_type=kind, nt_samples=n, stdevs=sigma, target=y[i:i + 1], **kw)
        noise = normal.out[0]
        base_kw = {"steps": 8} if base == "integrated_gradients" else {}
        ex = methods.create(kind, model, base=base, n_samples=n, sigma=sigma, relative=False, base_kw=base_kw, batch_size=4)
        with monkeypatch.context() as mp:
            mp.setattr(G, "shared_noise", lambda xx, k, seed=0: noise / sigma)
            ours = ex(x[i:i + 1], y[i:i + 1])
        assert_close_scaled(ours, ref)


@pytest.mark.parametrize("name", ["shapes/resnet_s", "shapes/vgg_s", "shapes/dense_s"])
def test_ig_completeness_at_256_steps(name, shapes_batch):
    from saliency_lab import models
    model = models.load_model(name)
    x, y, _ = shapes_batch
    attr = methods.create("integrated_gradients", model, steps=256, method="riemann_trapezoid", batch_size=512)(x, y)
    gap = G.completeness_gap(model, x, attr, y)
    assert gap.abs().median() < 0.01, gap
    # the relative error explodes where f(x) − f(baseline) ≈ 0 (one image here has Δ ≈ −0.01 logit):
    # measured against max(|Δ|, 1 logit) every image must be complete within 1 % on average
    delta = core.predict(model, x, y) - core.predict(model, torch.zeros_like(x), y)
    err = (attr.flatten(1).sum(1) - delta).abs() / delta.abs().clamp(min=1.0)
    assert err.mean() < 0.01, err


ALL = ["gradient", "input_x_gradient", "guided_backprop", "deconvnet", "integrated_gradients", "gradient_shap",
       "smoothgrad", "smoothgrad_sq", "vargrad"]
SMALL = {"integrated_gradients": {"steps": 8}, "gradient_shap": {"n_samples": 4, "stdevs": 0.1},
         "smoothgrad": {"n_samples": 4}, "smoothgrad_sq": {"n_samples": 4, "base": "guided_backprop"},
         "vargrad": {"n_samples": 4, "base": "integrated_gradients", "base_kw": {"steps": 4}}}


@pytest.mark.parametrize("name", ALL)
def test_batch_invariance_determinism_and_shape(name, embedded, shapes_batch):
    model = embedded["shapes/vgg_s"]
    x, y, _ = shapes_batch
    kw = SMALL.get(name, {})
    full = methods.create(name, model, batch_size=10, **kw)(x, y)
    assert full.shape == x.shape and torch.isfinite(full).all()
    for i in (0, 11):
        torch.testing.assert_close(methods.create(name, model, batch_size=3, **kw)(x[i:i + 1], y[i:i + 1]), full[i:i + 1],
                                   rtol=1e-4, atol=1e-6)
    assert torch.equal(methods.create(name, model, batch_size=10, **kw)(x, y), full)
    if name in ("gradient_shap", "smoothgrad", "smoothgrad_sq", "vargrad"):
        other = methods.create(name, model, batch_size=10, seed=1, **kw)(x, y)
        assert not torch.equal(other, full)


class CountingModel(nn.Module):
    "Records the largest batch the wrapped model is called with."
    def __init__(self, net): super().__init__(); self.net, self.largest = net, 0
    def forward(self, x): self.largest = max(self.largest, len(x)); return self.net(x)


@pytest.mark.parametrize("name, kw", [("integrated_gradients", {"steps": 50}), ("smoothgrad", {"n_samples": 25}),
                                      ("gradient_shap", {"n_samples": 20}),
                                      ("vargrad", {"n_samples": 5, "base": "integrated_gradients", "base_kw": {"steps": 10}})])
def test_forward_batches_are_bounded_by_batch_size(name, kw, embedded, shapes_batch):
    m = CountingModel(embedded["shapes/resnet_s"]).eval()
    x, y, _ = shapes_batch
    methods.create(name, m, batch_size=16, **kw)(x, y)
    assert 0 < m.largest <= 16


def _state(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    g, = torch.autograd.grad(out.sum(), x)
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    inplace = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    return out.detach(), g, hooks, inplace


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "smoothgrad"])
def test_relu_overrides_never_leak(name, resnet18, shapes_batch):
    x, y, _ = shapes_batch
    kw = {"base": "guided_backprop", "n_samples": 2} if name == "smoothgrad" else {}
    before = _state(resnet18, x[:3])
    assert any(before[3])                                    # torchvision's ReLUs are in place
    methods.create(name, resnet18, **kw)(x[:3], y[:3])
    after = _state(resnet18, x[:3])
    with pytest.raises(ValueError, match="out of range"):
        methods.create(name, resnet18, **kw)(x[:3], 5000)
    after_error = _state(resnet18, x[:3])
    for a, b, c in zip(before, after, after_error):
        if isinstance(a, torch.Tensor): assert torch.equal(a, b) and torch.equal(a, c)
        else: assert a == b == c
    assert before[2] == 0


def test_guided_backprop_on_other_activations():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.rand(1, 3, 8, 8)); net.eval()
    with pytest.raises(ValueError, match="SiLU"):
        methods.create("guided_backprop", net)
    a = methods.create("guided_backprop", net, allow_other_activations=True)(torch.rand(2, 3, 8, 8), 0)
    assert a.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="has none"):
        methods.create("deconvnet", nn.Sequential(nn.Conv2d(3, 2, 1), nn.GELU(), nn.Flatten()).eval())


def test_bad_hyper_parameters(embedded):
    m = embedded["shapes/resnet_s"]
    with pytest.raises(ValueError, match="method must be"): methods.create("integrated_gradients", m, method="simpson")
    with pytest.raises(ValueError, match="steps"): methods.create("integrated_gradients", m, steps=0)
    with pytest.raises(ValueError, match="base must be"): methods.create("smoothgrad", m, base="gradcam")
    with pytest.raises(ValueError, match="sigma"): methods.create("smoothgrad", m, sigma=-1)
    with pytest.raises(ValueError, match="baseline"):
        methods.create("integrated_gradients", m, baseline=torch.zeros(3, 5, 5))(torch.rand(1, 3, 64, 64), 0)
    with pytest.raises(ValueError, match="baselines"):
        methods.create("gradient_shap", m, baselines=torch.zeros(3, 64, 64))(torch.rand(1, 3, 64, 64), 0)
