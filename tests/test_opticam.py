"Opti-CAM (saliency_lab.methods.opticam): agreement with a plain one-image reference, per-image stopping, the AD/AG claim, properties."
import copy
import pytest, torch, torchvision
import torch.nn.functional as F
from saliency_lab import core, data, models
from saliency_lab.methods.base import METHODS
from saliency_lab.methods.cam import GradCAM
from saliency_lab.methods.opticam import OptiCAM, normalize_mask, OBJECTIVES, NORMS
from saliency_lab.metrics import average_drop, average_gain

EMBEDDED = ["shapes/resnet_s", "shapes/vgg_s"]


# ---------------------------------------------------------------- an independent reference
def reference_opticam(model, layer_name, x, c, objective="mask", norm="range", selector="logit", h="identity",
                      iterations=100, lr=0.1, tol=1e-10):
    """Opti-CAM for ONE image `x` [1, C, H, W], written from the paper: features by a forward hook, u = 0,
    torch.optim.Adam over u, a plain loop that stops when |loss_t − loss_{t−1}| < tol. Returns up(S(x; u*)) [H, W]."""
    layer = dict(model.named_modules())[layer_name]
    feats = []
    handle = layer.register_forward_hook(lambda mod, inp, out: feats.append(out.detach().clone()))
    try:
        with torch.no_grad():
            logits0 = model(x)
    finally:
        handle.remove()
    A = feats[0]                                                     # [1, K, h, w]

    def g(logits):
        return logits[0, c] if selector == "logit" else logits.softmax(-1)[0, c]

    def saliency(u):
        S = (u.softmax(-1)[0][:, None, None] * A[0]).sum(0)            # eq. 8
        S = S if h == "identity" else S.clamp(min=0)
        return F.interpolate(S[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]

    def n(S):
        if norm == "range": return (S - S.min()) / (S.max() - S.min())
        if norm == "max": return S / S.max()
        return torch.sigmoid(S)

    g0 = g(logits0)
    u = torch.zeros(1, A.shape[1], dtype=A.dtype, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    prev = None
    for _ in range(iterations):
        s = n(saliency(u))
        g_in = g(model(x * s))
        if objective == "mask": obj = g_in
        elif objective == "diff": obj = -(g0 - g_in).abs()
        else:
            g_out = g(model(x * (1 - s)))
            obj = g_in - g_out if objective == "iomask" else -(g0 - g_in).abs() + (g0 - g_out).abs()
        loss = -obj
        if prev is not None and abs(loss.item() - prev) < tol: break
        prev = loss.item()
        opt.zero_grad(); loss.backward(); opt.step()
    return saliency(u).detach()


@pytest.fixture(scope="module")
def resnet64(embedded):
    return copy.deepcopy(embedded["shapes/resnet_s"]).double()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_equals_reference_float64(objective, norm, resnet64, shapes_batch):
    "Every objective × normalisation: our batched optimisation of 2 images = the reference, image by image."
    x, y, _ = shapes_batch
    x, y = x[:2].double(), y[:2]
    ours = OptiCAM(resnet64, layer="net.layer3", objective=objective, norm=norm, iterations=6)(x, y)
    for i in range(len(x)):
        ref = reference_opticam(resnet64, "net.layer3", x[i:i + 1], int(y[i]), objective, norm, iterations=6)
        torch.testing.assert_close(ours[i, 0], ref, rtol=0, atol=1e-9 * ref.abs().max().item())   # measured: ≤ 2e-11


@pytest.mark.parametrize("kw", [dict(selector="probability"), dict(h="relu", objective="iomask"), dict(lr=0.5)],
                         ids=["probability", "relu-iomask", "lr0.5"])
def test_options_equal_reference_float64(kw, embedded, shapes_batch):
    model = copy.deepcopy(embedded["shapes/vgg_s"]).double()
    x, y, _ = shapes_batch
    x, y = x[2:4].double(), y[2:4]
    ours = OptiCAM(model, layer="net.features.13", iterations=6, **kw)(x, y)
    for i in range(len(x)):
        ref = reference_opticam(model, "net.features.13", x[i:i + 1], int(y[i]), iterations=6, **kw)
        torch.testing.assert_close(ours[i, 0], ref, rtol=0, atol=1e-9 * ref.abs().max().item())


# ---------------------------------------------------------------- batch invariance, per-image stopping
@pytest.fixture(scope="module")
def shapes16():
    x, y, _ = data.load_batch(data.load_dataset("shapes", n=16))
    return x, y


def test_alone_equals_in_batch_of_16_float64(resnet64, shapes16):
    "float64: an image's map, history and number of steps are the same alone or among 16 (measured: bit for bit)."
    x, y = shapes16
    x = x.double()
    ex = OptiCAM(resnet64, iterations=15)
    full = ex(x, y); hist, steps = ex.history_.clone(), ex.n_steps_.clone()
    for i in (0, 7, 15):
        alone = ex(x[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(alone, full[i:i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(ex.history_, hist[i:i + 1], rtol=0, atol=1e-12)
        assert torch.equal(ex.n_steps_, steps[i:i + 1])
    chunked = OptiCAM(resnet64, iterations=15, batch_size=5)(x, y)    # chunks of 5, 5, 5, 1
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)


def test_each_image_stops_on_its_own_loss(resnet64, shapes16):
    """A black image gives the same masked image whatever u is: its loss does not change, so it stops after
    one step while its batch-mates go on, and their maps are those they have alone."""
    x, y = shapes16
    x = x[:3].double().clone()
    x[1] = 0
    ex = OptiCAM(resnet64, iterations=12)
    out = ex(x, y[:3])
    assert ex.n_steps_.tolist() == [12, 1, 12]
    assert ex.history_.shape == (3, 12)
    assert torch.isfinite(ex.history_[1, :2]).all() and torch.isnan(ex.history_[1, 2:]).all()
    assert torch.isfinite(ex.history_[[0, 2]]).all()
    for i in (0, 2):
        torch.testing.assert_close(ex(x[i:i + 1], y[i:i + 1]), out[i:i + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["shapes/resnet_s", "shapes/vgg_s"])
def test_float32_alone_equals_in_batch_of_16_with_padding(name, embedded, shapes16):
    """float32 with the default pad_batch=True: every pass has the shape of a full chunk, so an image alone and
    inside a batch of 16 go through identically rounded convolutions: maps equal bit for bit, 100 iterations."""
    x, y = shapes16
    ex = OptiCAM(embedded[name], batch_size=16)
    full = ex(x, y)
    for i in (0, 7, 15):
        assert torch.equal(ex(x[i:i + 1], y[i:i + 1]), full[i:i + 1]), i


def test_float32_without_padding_depends_on_rounding(embedded, shapes16):
    """pad_batch=False: a convolution over 16 images rounds each image differently (~1e-7) than over 1, and the
    optimisation amplifies it; within 5 iterations it stays below 1e-2 (the padding above removes it)."""
    x, y = shapes16
    ex = OptiCAM(embedded["shapes/resnet_s"], iterations=5, pad_batch=False)
    full = core.to_saliency(ex(x, y))
    alone = core.to_saliency(torch.cat([ex(x[i:i + 1], y[i:i + 1]) for i in range(0, 16, 5)]))
    assert (alone - full[::5]).abs().max() < 1e-2


def test_deterministic(embedded, shapes16):
    x, y = shapes16
    ex = OptiCAM(embedded["shapes/vgg_s"], iterations=10)
    a, h = ex(x[:6], y[:6], return_history=True)
    b, h2 = ex(x[:6], y[:6], return_history=True)
    assert torch.equal(a, b) and torch.equal(h, h2)


# ---------------------------------------------------------------- the optimisation and the paper's claim
@pytest.fixture(scope="module")
def runs32(embedded):
    "Opti-CAM (paper defaults: Mask, range, logit, 100 iterations, lr 0.1) and Grad-CAM on 32 shapes images."
    x, y, _ = data.load_batch(data.load_dataset("shapes", n=32))
    out = {}
    for name in EMBEDDED:
        model = embedded[name]
        ex = OptiCAM(model)
        opti = core.to_saliency(ex(x, y))
        grad = core.to_saliency(GradCAM(model)(x, y))
        out[name] = dict(model=model, opti=opti, grad=grad, history=ex.history_, steps=ex.n_steps_)
    return x, y, out


@pytest.mark.parametrize("name", EMBEDDED)
def test_objective_increases(name, runs32):
    x, y, out = runs32
    h, steps = out[name]["history"], out[name]["steps"]
    # an image whose objective stops changing (|ΔF| < tol) stops early; history is NaN after its last evaluation.
    # Whether a flat run meets tol exactly depends on float rounding (the CPU's kernels), so allow a few such images.
    assert h.shape == (32, 100) and ((steps >= 50) & (steps <= 100)).all() and (steps == 100).float().mean() >= 0.9
    n_eval = (steps + 1).clamp(max=100)                                # evaluations recorded per image
    valid = torch.arange(100)[None] < n_eval[:, None]
    assert torch.isfinite(h[valid]).all() and torch.isnan(h[~valid]).all()
    last = h.gather(1, (n_eval - 1)[:, None])[:, 0]
    assert (last > h[:, 0]).all()                                      # every image ends above its start
    h = torch.where(valid, h, last[:, None])                           # a stopped image stays at its last value
    mean = h.mean(0)
    assert (mean.diff() >= 0).float().mean() >= 0.9                   # the mean curve rises almost everywhere (Adam at lr 0.1
                                                                      # wiggles: 95 of 99 steps rise on one CPU, 94 on another)
    assert (mean.diff()[-20:] >= 0).all() or mean[-1] >= mean[:-1].max() - 1e-3 * mean.abs().max()


@pytest.mark.parametrize("name", EMBEDDED)
def test_lower_ad_higher_ag_than_gradcam(name, runs32):
    "003 Table 1: Opti-CAM's average drop is lower and its average gain higher than Grad-CAM's."
    x, y, out = runs32
    r = out[name]
    ad = {k: average_drop(r["model"], x, r[k], y).mean().item() for k in ("opti", "grad")}
    ag = {k: average_gain(r["model"], x, r[k], y).mean().item() for k in ("opti", "grad")}
    assert ad["opti"] < ad["grad"] and ag["opti"] > ag["grad"], (ad, ag)


def test_saliency_is_the_optimised_mask(runs32):
    "With the default range normalisation, core.to_saliency of the attribution is the mask n(up(S)) that was optimised."
    x, y, out = runs32
    ex = OptiCAM(out["shapes/resnet_s"]["model"], iterations=3)
    a = ex(x[:4], y[:4])
    torch.testing.assert_close(core.to_saliency(a), normalize_mask(a, "range")[:, 0], rtol=0, atol=1e-6)


def test_zero_iterations_is_the_mean_feature_map(embedded, shapes16):
    "u = 0: the initial map is the average of the feature maps (uniform softmax weights)."
    x, y = shapes16
    model = embedded["shapes/resnet_s"]
    feats = []
    h = models.default_layer(model).register_forward_hook(lambda m, i, o: feats.append(o.detach().clone()))
    try:
        with torch.no_grad(): model(x[:3])
    finally:
        h.remove()
    ex = OptiCAM(model, iterations=0)
    a = ex(x[:3], y[:3])
    expect = F.interpolate(feats[0].mean(1, keepdim=True), size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(a, expect, rtol=1e-5, atol=1e-6)
    assert ex.history_.shape == (3, 0) and ex.n_steps_.tolist() == [0, 0, 0]


def test_registered_and_create():
    assert METHODS["opticam"] is OptiCAM


# ---------------------------------------------------------------- transformers
def tiny_vit():
    """A small torchvision ViT with random weights. torchvision initialises the head to zero (all logits 0: nothing to
    optimise) and the layer norms to γ = 1, β = 0, which makes the uniform-weight map Σ_k A^k / K of a layer norm's
    output exactly zero; both are randomised here, as a trained network would have them."""
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=5)
    with torch.no_grad():
        net.heads.head.weight.normal_(0, 0.5)
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm): m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.3)
    return models.Normalized(net).eval()


def test_vit_tokens_run():
    vit = tiny_vit()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ex = OptiCAM(vit, layer="net.encoder.layers.encoder_layer_1.ln_1", iterations=20)
    a = ex(x, torch.tensor([0, 3, 4]))
    assert a.shape == (3, 1, 32, 32) and torch.isfinite(a).all()
    assert (a.flatten(1).amin(1) < 0).all()                           # tokens: h = identity keeps negative values
    assert ex.history_.shape == (3, 20) and (ex.history_[:, -1] > ex.history_[:, 0]).all()
    assert sum(len(m._forward_hooks) for m in vit.modules()) == 0
    b = OptiCAM(vit, layer="net.encoder.layers.encoder_layer_1.ln_1", iterations=20)(x[1:2], 3)
    torch.testing.assert_close(b, a[1:2], rtol=0, atol=1e-4 * a[1].abs().max().item())   # measured: identical here


# ---------------------------------------------------------------- hooks and errors
class Exploding(torch.nn.Module):
    "A model that raises in its forward pass, after the hooked layer has run."
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
    def forward(self, x):
        self.conv(x)
        raise RuntimeError("boom")


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_no_hook_leaks(embedded, shapes16):
    x, y = shapes16
    model = embedded["shapes/resnet_s"]
    before = n_hooks(model)
    OptiCAM(model, iterations=2)(x[:2], y[:2])
    assert n_hooks(model) == before
    ex = OptiCAM(model, iterations=2)
    with pytest.raises(ValueError, match="out of range"):
        ex(x[:2], torch.tensor([0, 99]))
    assert n_hooks(model) == before and ex._records is None
    bad = Exploding().eval()
    with pytest.raises(RuntimeError, match="boom"):
        OptiCAM(bad, layer="conv")(torch.rand(1, 3, 8, 8), 0)
    assert n_hooks(bad) == 0
    ex(x[:2], y[:2])                                                  # still usable after the errors
    assert ex.history_.shape == (2, 2)


@pytest.mark.parametrize("kw, msg", [
    (dict(objective="loss"), "objective must be one of"), (dict(norm="minmax"), "norm must be one of"),
    (dict(selector="prob"), "selector must be one of"), (dict(h="tanh"), "h must be"),
    (dict(iterations=-1), "iterations"), (dict(iterations=2.5), "iterations"), (dict(lr=0), "lr"),
    (dict(lr=float("nan")), "lr"), (dict(tol=-1.0), "tol"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=0), "eps"), (dict(batch_size=0), "batch_size"), (dict(layer="layer9"), "unknown layer"),
])
def test_bad_arguments(kw, msg, embedded):
    with pytest.raises(ValueError, match=msg):
        OptiCAM(embedded["shapes/resnet_s"], **kw)


def test_bad_input(embedded, shapes16):
    x, y = shapes16
    model = embedded["shapes/resnet_s"]
    ex = OptiCAM(model, iterations=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"): ex(x[:2] * 2, y[:2])
    with pytest.raises(ValueError, match="rank 4"): ex(x[0], y[0])
    with pytest.raises(ValueError, match="out of range"): ex(x[:2], 8)
    with pytest.raises(ValueError): ex(x[:2], y[:3])
    with pytest.raises(ValueError, match=r"\[B, K, h, w\]"): OptiCAM(model, layer="net.fc", iterations=1)(x[:2], y[:2])
    train = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="train mode"): OptiCAM(train)
