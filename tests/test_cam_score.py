"Masking CAMs (saliency_lab.methods.cam_score): agreement with pytorch-grad-cam and TorchCAM, a loop reference for Recipro-CAM, properties."
import copy, warnings
import numpy as np, pandas as pd, pytest, torch, torch.nn as nn, torchvision
from saliency_lab import cli, core, models
from saliency_lab.methods import cam_score as S
from saliency_lab.methods.base import METHODS
from saliency_lab.methods.cam import layer_activations

EMBEDDED = ["shapes/resnet_s", "shapes/vgg_s"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Many small forward passes: one intra-op thread avoids OpenMP spin-waits on a busy 2-core CI machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pearson(a, b):
    "Pearson correlation of each pair of maps (flattened rows), float64."
    a, b = torch.as_tensor(np.asarray(a)).flatten(1).double(), torch.as_tensor(np.asarray(b)).flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def setups(embedded, resnet18, vgg11_bn, shapes_batch):
    "(model, layer name, x, y): the embedded models on 2 shapes images at 64 px; random torchvision models on 1 image."
    x, y, _ = shapes_batch
    small = torch.nn.functional.interpolate(x[:1], size=32, mode="bilinear", antialias=True).clamp(0, 1)
    return {"shapes/resnet_s": (embedded["shapes/resnet_s"], "net.layer3", x[:2], y[:2]),
            "shapes/vgg_s": (embedded["shapes/vgg_s"], "net.features.13", x[:2], y[:2]),
            "resnet18": (resnet18, "net.layer2", x[:1], torch.tensor([3])),            # 128 channels, 8×8
            "vgg11_bn": (vgg11_bn, "net.features.2", small, torch.tensor([7]))}        # 64 channels, 32×32


def pgc_run(cls, model, layer, x, y, **kw):
    "pytorch-grad-cam's maps [B, H, W] (its ReLU, min-max, cv2 resize) and the channel weights it computed on the way."
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    rec = {}
    with cls(model, target_layers=[layer], **kw) as cam:
        if "batch_size" not in kw: cam.batch_size = 16
        orig = cam.get_cam_weights
        def spy(*a, **k):
            rec["w"] = orig(*a, **k); return rec["w"]
        cam.get_cam_weights = spy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in y])
    assert n_hooks(model) == 0
    return maps, torch.as_tensor(np.asarray(rec["w"]))


# ---------------------------------------------------------------- agreement with pytorch-grad-cam
@pytest.mark.parametrize("name", EMBEDDED + ["resnet18", "vgg11_bn"])
def test_scorecam_equals_pytorch_grad_cam(name, setups):
    model, layer, x, y = setups[name]
    ref_maps, ref_w = pgc_run(__import__("pytorch_grad_cam").ScoreCAM, model, core.get_layer(model, layer), x, y)
    ex = S.ScoreCAM(model, layer=layer, align_corners=True, batch_size=16)     # pgc upsamples masks with align_corners=True
    w = ex.weights(x, y)
    # the same algorithm: weights agree to float32 rounding (measured ≤ 1.2e-6 of the largest weight; pgc adds 1e-8 to the range)
    assert (w.double() - ref_w.double()).abs().max() <= 2e-5 * ref_w.abs().max()
    r = pearson(core.to_saliency(ex(x, y)), ref_maps)          # its cv2 resize vs our bilinear upsampling of the map
    assert (r >= 0.999).all(), r


@pytest.mark.parametrize("name", EMBEDDED + ["resnet18", "vgg11_bn"])
def test_ablationcam_equals_pytorch_grad_cam(name, setups):
    from pytorch_grad_cam import AblationCAM as PGCAblation
    model, layer, x, y = setups[name]
    ref_maps, ref_w = pgc_run(PGCAblation, model, core.get_layer(model, layer), x, y, batch_size=16)
    for share in (None, False):              # our image once per chunk, and each job's image fed again (as pgc)
        ex = S.AblationCAM(model, layer=layer, share_prefix=share, batch_size=16)
        w = ex.weights(x, y)
        assert (w.double() - ref_w.double()).abs().max() <= 1e-4 * ref_w.abs().max(), share   # measured ≤ 1.7e-5 relative
    r = pearson(core.to_saliency(ex(x, y)), ref_maps)
    assert (r >= 0.999).all(), r


def test_scorecam_on_tokens_equals_pytorch_grad_cam(shapes_batch):
    "A tiny ViT: our token grid is pytorch-grad-cam's usual reshape_transform (class token dropped, tokens on their grid)."
    from pytorch_grad_cam import ScoreCAM as PGCScore
    vit, layer, xv = tiny_vit(shapes_batch)
    def reshape(t): return t[:, 1:].reshape(t.shape[0], 8, 8, t.shape[2]).permute(0, 3, 1, 2)
    y = torch.tensor([0, 3])
    ref_maps, ref_w = pgc_run(PGCScore, vit, core.get_layer(vit, layer), xv[:2], y, reshape_transform=reshape)
    ex = S.ScoreCAM(vit, layer=layer, align_corners=True, batch_size=16)
    assert (ex.weights(xv[:2], y).double() - ref_w.double()).abs().max() <= 2e-5 * ref_w.abs().max()
    assert (pearson(core.to_saliency(ex(xv[:2], y)), ref_maps) >= 0.999).all()


# ---------------------------------------------------------------- agreement with TorchCAM
def torchcam_maps(cls, model, layer, x, y, noise=None, **kw):
    "TorchCAM's raw maps at the layer's resolution (ReLU, not normalised); `noise` replaces SS-CAM's Gaussian draws."
    with cls(model, target_layer=layer, input_shape=tuple(x.shape[1:]), **kw) as ex:
        if noise is not None:
            class Draws:                    # TorchCAM calls _distrib.sample(activation.size()) once per draw, in order
                def __init__(self): self.i = 0
                def sample(self, size):
                    z = noise[self.i]; self.i += 1
                    return z.expand(size).clone()
            ex._distrib = Draws()
        with torch.no_grad(): model(x)
        out = ex(class_idx=y.tolist(), normalized=False)[0]
    assert n_hooks(model) == 0
    return out


@pytest.mark.parametrize("name", EMBEDDED)
def test_score_family_equals_torchcam(name, setups):
    "Score-CAM, IS-CAM and SS-CAM with TorchCAM's conventions (normalise at the layer, then upsample) and, for SS-CAM, our noise."
    import torchcam.methods as tc
    model, layer, x, y = setups[name]
    ours = lambda ex: ex.layer_cam(x, y).clamp(min=0)[:, 0]
    ref = torchcam_maps(tc.ScoreCAM, model, layer, x, y, batch_size=16)
    got = ours(S.ScoreCAM(model, layer=layer, mask_norm="layer", batch_size=16))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()                   # measured ≤ 4e-7 relative
    ref = torchcam_maps(tc.ISCAM, model, layer, x, y, batch_size=16, num_samples=4)
    got = ours(S.ISCAM(model, layer=layer, num_samples=4, mask_norm="layer", batch_size=16))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    ss = S.SSCAM(model, layer=layer, num_samples=3, mask_norm="layer", batch_size=16, seed=5)
    K, (H, W) = layer_activations(model, core.get_layer(model, layer), x)[0].shape[1], x.shape[-2:]
    noise = [ss.std * ss.noise(torch.full((K,), s), torch.arange(K), (H, W)) for s in range(3)]
    ref = torchcam_maps(tc.SSCAM, model, layer, x, y, noise=noise, batch_size=16, num_samples=3, std=2.0)
    assert (ours(ss) - ref).abs().max() <= 1e-4 * ref.abs().max()               # measured ≤ 1.1e-5 relative


def test_torchcam_defaults_are_ours(embedded):
    import torchcam.methods as tc
    m = embedded["shapes/resnet_s"]
    with tc.SSCAM(m, target_layer="net.layer3", input_shape=(3, 64, 64)) as t:
        assert (t.num_samples, t.std) == (S.SSCAM(m).num_samples, S.SSCAM(m).std) == (35, 2.0)
    with tc.ISCAM(m, target_layer="net.layer3", input_shape=(3, 64, 64)) as t:
        assert t.num_samples == S.ISCAM(m).num_samples == 10


# ---------------------------------------------------------------- Recipro-CAM and Ablation-CAM against loops
def loop_forward(model, layer, x1, fn):
    "The model on one image with the layer's output replaced by fn(output), one plain forward pass."
    h = core.get_layer(model, layer).register_forward_hook(lambda m, i, o: fn(o))
    try:
        with torch.no_grad(): return model(x1)
    finally: h.remove()


def recipro_loop(model, layer, x, y, gaussian=False):
    "Recipro-CAM one position at a time: keep position (i, j) of the layer's output (or its 3×3 Gaussian neighbourhood)."
    k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    out = []
    for b in range(len(x)):
        A = layer_activations(model, core.get_layer(model, layer), x[b:b + 1])[0]
        h, w = A.shape[-2:]
        cam = torch.zeros(h, w)
        for i in range(h):
            for j in range(w):
                M = torch.zeros(h + 2, w + 2)
                if gaussian: M[i:i + 3, j:j + 3] = k
                else: M[i + 1, j + 1] = 1
                M = M[1:-1, 1:-1]
                def keep(o):
                    if o.ndim == 4: return o * M
                    t = torch.ones(o.shape[1]); t[o.shape[1] - h * w:] = M.flatten()
                    return o * t[None, :, None]
                cam[i, j] = loop_forward(model, layer, x[b:b + 1], keep).softmax(-1)[0, y[b]]
        out.append(cam)
    return torch.stack(out)


@pytest.mark.parametrize("name,gaussian", [("shapes/resnet_s", False), ("shapes/resnet_s", True), ("shapes/vgg_s", True)])
def test_reciprocam_equals_position_loop(name, gaussian, setups):
    model, layer, x, y = setups[name]
    ref = recipro_loop(model, layer, x[:1], y[:1], gaussian)
    for share in (None, False):
        got = S.ReciproCAM(model, layer=layer, gaussian=gaussian, share_prefix=share, batch_size=24).layer_cam(x[:1], y[:1])
        torch.testing.assert_close(got[:, 0], ref, rtol=1e-4, atol=1e-6)


def tiny_vit(shapes_batch):
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5)
    nn.init.normal_(net.heads.head.weight, std=0.5)          # torchvision's head starts at zero: every logit equal
    vit = models.Normalized(net).eval()
    x = torch.nn.functional.interpolate(shapes_batch[0][:3], size=32, mode="bilinear", antialias=True).clamp(0, 1)
    return vit, "net.encoder.layers.encoder_layer_1.ln_1", x


def test_hook_methods_on_tokens_equal_loops(shapes_batch):
    "Tokens: Recipro-CAM keeps the class token and masks patch tokens; Ablation-CAM zeroes one feature in every token."
    vit, layer, x = tiny_vit(shapes_batch)
    x, y = x[:2], torch.tensor([1, 4])
    ref = recipro_loop(vit, layer, x, y)
    for share in (None, False):
        got = S.ReciproCAM(vit, layer=layer, share_prefix=share, batch_size=20).layer_cam(x, y)
        torch.testing.assert_close(got[:, 0], ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad(): logits = vit(x)
    D = 16
    ref_w = torch.zeros(len(x), D)
    for b in range(len(x)):
        yc = logits[b, y[b]]
        for d in range(D):
            def ablate(o):
                o = o.clone(); o[:, :, d] = 0; return o
            ref_w[b, d] = (yc - loop_forward(vit, layer, x[b:b + 1], ablate)[0, y[b]]) / yc
    for share in (None, False):
        torch.testing.assert_close(S.AblationCAM(vit, layer=layer, share_prefix=share, batch_size=7).weights(x, y), ref_w,
                                   rtol=1e-4, atol=1e-5)


def test_shared_prefix_with_a_residual_around_the_layer(setups):
    "A layer inside a ResNet block: the identity branch (one row) broadcasts over the expanded copies."
    import copy
    model, _, x, y = setups["resnet18"]
    # float64: in float32 the two paths (one shared prefix vs a copy per channel) round differently by ~1e-6,
    # which is 3 % of the smallest weights on some CPUs; in float64 they must agree to rounding
    model, x = copy.deepcopy(model).double(), x.double()
    layer = "net.layer3.1.bn2"
    assert S.prefix_shareable(model, core.get_layer(model, layer), x[:1])
    a = S.AblationCAM(model, layer=layer, share_prefix=True, batch_size=64).weights(x, y)
    b = S.AblationCAM(model, layer=layer, share_prefix=False, batch_size=64).weights(x, y)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())


def test_prefix_check_refuses_a_model_that_mixes_rows():
    "A model that reshapes by a batch size read before the layer cannot take expanded copies: the check says so, images are fed again."
    class FlatB(nn.Module):              # the batch size read before the layer, used after it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1); self.fc = nn.Linear(4 * 8 * 8, 3)
        def forward(self, x):
            B = x.shape[0]
            return self.fc(torch.relu(self.conv(x)).reshape(B, -1))
    torch.manual_seed(0)
    m = FlatB().eval()
    x = torch.rand(2, 3, 8, 8)
    assert not S.prefix_shareable(m, m.conv, x[:1])
    a = S.AblationCAM(m, layer="conv", batch_size=3).weights(x, 0)
    b = S.AblationCAM(m, layer="conv", share_prefix=False, batch_size=3).weights(x, 0)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- skipping silent channels
def count_rows(model):
    rows = []
    return rows, model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))


@pytest.mark.parametrize("method", ["scorecam", "iscam", "ablationcam"])
def test_skipping_silent_channels_changes_nothing(method, embedded, shapes_batch):
    "Half of layer3's channels silenced (BN bias −1000): skipped, they save forward passes and give the same weights."
    model = copy.deepcopy(embedded["shapes/resnet_s"])
    with torch.no_grad(): model.net.layer3[1].bn2.bias[::2] = -1e3
    x, y, _ = shapes_batch
    x, y = x[:2], y[:2]
    A = layer_activations(model, model.net.layer3, x)[0]
    assert (A.flatten(2).amax(-1)[:, ::2] == 0).all()
    kw = {"num_samples": 2} if method == "iscam" else {}
    ex, full = METHODS[method](model, batch_size=16, **kw), METHODS[method](model, batch_size=16, **kw)
    full._skip = False
    rows, h = count_rows(model)
    w = ex.weights(x, y); n_skip = sum(rows); rows.clear()
    w_full = full.weights(x, y); n_full = sum(rows)
    h.remove()
    assert n_skip < n_full
    torch.testing.assert_close(w, w_full, rtol=1e-4, atol=1e-6)
    if method != "ablationcam": assert (w[:, ::2] < w[:, 1::2].amax(1, keepdim=True)).all()


# ---------------------------------------------------------------- properties
FAST = {"scorecam": {}, "iscam": {"num_samples": 2}, "sscam": {"num_samples": 2}, "ablationcam": {}, "reciprocam": {}}


@pytest.mark.parametrize("method", list(FAST))
def test_batch_invariant_and_deterministic(method, embedded, shapes_batch):
    model = embedded["shapes/vgg_s"]
    x, y, _ = shapes_batch
    x, y = x[:3], y[:3]
    full = METHODS[method](model, batch_size=64, **FAST[method])(x, y)
    one = METHODS[method](model, batch_size=7, **FAST[method])(x[1:2], y[1:2])      # chunks cut across images
    torch.testing.assert_close(core.to_saliency(one), core.to_saliency(full[1:2]), rtol=0, atol=1e-5)
    assert torch.equal(METHODS[method](model, batch_size=64, **FAST[method])(x, y), full)
    assert full.shape == (3, 1, 64, 64) and torch.isfinite(full).all() and (full >= 0).all()
    assert n_hooks(model) == 0


def test_sscam_seed(embedded, shapes_batch):
    m = embedded["shapes/resnet_s"]
    x, y, _ = shapes_batch
    a = S.SSCAM(m, num_samples=2, seed=1)(x[:1], y[:1])
    assert not torch.equal(a, S.SSCAM(m, num_samples=2, seed=2)(x[:1], y[:1]))
    g = lambda: torch.Generator().manual_seed(4)
    assert torch.equal(S.SSCAM(m, num_samples=2, seed=g())(x[:1], y[:1]), S.SSCAM(m, num_samples=2, seed=g())(x[:1], y[:1]))


class Bomb(nn.Module):
    "A model that fails on its n-th forward pass."
    def __init__(self, net, n):
        super().__init__(); self.net, self.n, self.calls = net, n, 0
    def forward(self, x):
        self.calls += 1
        if self.calls == self.n: raise RuntimeError("boom")
        return self.net(x)


@pytest.mark.parametrize("method", list(FAST))
def test_no_hook_left_after_an_error(method, embedded, shapes_batch):
    x, y, _ = shapes_batch
    for n in (2, 4):
        m = Bomb(embedded["shapes/resnet_s"], n).eval()
        with pytest.raises(RuntimeError, match="boom"):
            METHODS[method](m, layer="net.net.layer3", batch_size=16, **FAST[method])(x[:2], y[:2])
        assert n_hooks(m) == 0


def test_bad_arguments(embedded, shapes_batch):
    m = embedded["shapes/resnet_s"]
    x, y, _ = shapes_batch
    bad = [(lambda: S.ScoreCAM(m, selector="probability"), "selector"),
           (lambda: S.ScoreCAM(m, mask_norm="before"), "mask_norm"),
           (lambda: S.ScoreCAM(m, baseline="blur"), "baseline"),
           (lambda: S.ScoreCAM(m, baseline=torch.zeros(3, 8, 8))(x[:1], y[:1]), "baseline"),
           (lambda: S.ScoreCAM(m, batch_size=0), "batch_size"),
           (lambda: S.ScoreCAM(m, layer="layer9"), "unknown layer"),
           (lambda: S.ScoreCAM(m, layer="net.fc")(x[:1], y[:1]), "[B, K, h, w]"),
           (lambda: S.ScoreCAM(m)(x[:1], 8), "out of range"),
           (lambda: S.ScoreCAM(m)(x[:2], torch.tensor([1, 2, 3])), "target"),
           (lambda: S.ScoreCAM(m)(x[:1] * 2, y[:1]), "[0, 1]"),
           (lambda: S.ISCAM(m, num_samples=0), "num_samples"),
           (lambda: S.ISCAM(m, path="straight"), "path"),
           (lambda: S.SSCAM(m, std=-1.0), "std"),
           (lambda: S.SSCAM(m, num_samples=0), "num_samples"),
           (lambda: S.AblationCAM(m, reshape=lambda t: t), "reshape"),
           (lambda: S.AblationCAM(m, share_prefix="yes"), "share_prefix"),
           (lambda: S.AblationCAM(m)(x[:1], 8), "out of range"),
           (lambda: S.ReciproCAM(m, selector="softmax"), "selector"),
           (lambda: S.ReciproCAM(m, layer="net.layer1.0.relu")(x[:1], y[:1]), "more than once")]
    for f, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            f()
    assert n_hooks(m) == 0


def test_registered():
    for n, cls in [("scorecam", S.ScoreCAM), ("sscam", S.SSCAM), ("iscam", S.ISCAM), ("ablationcam", S.AblationCAM),
                   ("reciprocam", S.ReciproCAM)]:
        assert METHODS[n] is cls


# ---------------------------------------------------------------- the benchmark notebook
def test_papermill_smoke_benchmark_cam(tmp_path):
    "The benchmark notebook runs end to end with tiny parameters and writes one row per model and method."
    out = tmp_path / "figs"
    cli.reproduce("quick", only="benchmark_cam", out_root=out, progress=False,
                  params={"n_images": 1, "batch_size": 64, "repeats": 1, "models": ["shapes/resnet_s", "shapes/vgg_s"],
                          "opticam": False})
    t = pd.read_csv(out / "benchmark_cam" / "timing.csv")
    assert t["model"].nunique() == 2 and set(t["method"]) >= {"Score-CAM", "Ablation-CAM"}
    t = t[t["method"].isin(["Score-CAM", "Ablation-CAM"])]
    assert len(t) == 4 and (t["map Pearson (min)"] > 0.999).all()
    assert (t["ours (s/image)"] > 0).all() and (t["pytorch-grad-cam (s/image)"] > 0).all()
    assert np.allclose(t["pgc / ours"], t["pytorch-grad-cam (s/image)"] / t["ours (s/image)"], rtol=1e-2)
    assert "Benchmark: masking CAMs vs pytorch-grad-cam" in (out / "INDEX.md").read_text()
