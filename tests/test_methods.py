import copy, numpy as np, pytest, torch, torch.nn as nn
from saliency_lab import core, methods, models


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# ---------------------------------------------------------------- conformance with reference libraries
@pytest.mark.parametrize("fixture", ["resnet18", "vgg11_bn", "embedded"])
def test_gradient_equals_captum_saliency(fixture, request, shapes_batch):
    from captum.attr import Saliency
    model = request.getfixturevalue(fixture)
    if fixture == "embedded": model = model["shapes/resnet_s"]
    x, y, _ = shapes_batch
    ours = methods.create("gradient", model)(x, y)
    ref = Saliency(model).attribute(x.clone().requires_grad_(), target=y, abs=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(methods.create("gradient", model, abs=True)(x, y),
                               Saliency(model).attribute(x.clone().requires_grad_(), target=y), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fixture, layer", [("resnet18", "layer4.1"), ("resnet18", "layer3.0.conv2"),
                                            ("vgg11_bn", "features.24"), ("embedded", None)])
def test_gradcam_equals_captum_layergradcam_exactly(fixture, layer, request, shapes_batch):
    "Captum's LayerGradCAM + bilinear interpolation is the same algorithm: equal before normalisation."
    from captum.attr import LayerGradCam, LayerAttribution
    model = request.getfixturevalue(fixture)
    if fixture == "embedded": model = model["shapes/vgg_s"]
    x, y, _ = shapes_batch
    ex = methods.create("gradcam", model, layer=layer)
    ref = LayerGradCam(model, ex.layer).attribute(x, target=y, relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, x.shape[-2:], interpolate_mode="bilinear")
    torch.testing.assert_close(ex(x, y), ref, rtol=1e-4, atol=1e-6)


class FullRes(nn.Module):
    "A CNN whose target layer keeps the input resolution, so no resizing differs between libraries."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        self.head[2].bias.data.zero_()         # the predicted logit is then Σ_k w_k·mean(A_k) > 0: non-trivial maps
    def forward(self, x): return self.head(self.features(x))


def test_gradcam_equals_pytorch_grad_cam_at_full_resolution(shapes_batch):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model = FullRes().eval()
    x, _, _ = shapes_batch
    y = model(x).argmax(1)
    ours = core.to_saliency(methods.create("gradcam", model, layer="features.3")(x, y))
    with GradCAM(model=model, target_layers=[model.features[3]]) as cam:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in y]))
    assert (ref.flatten(1).amax(1) > 0.99).all()          # every map is non-constant
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture, layer", [("resnet18", "layer4"), ("embedded", None)])
def test_gradcam_matches_pytorch_grad_cam_after_upsampling(fixture, layer, request, shapes_batch):
    "pytorch-grad-cam normalises before resizing with OpenCV: the maps agree up to interpolation (Pearson ≥ 0.99)."
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model = request.getfixturevalue(fixture)
    if fixture == "embedded": model = model["shapes/resnet_s"]
    x, y, _ = shapes_batch
    ex = methods.create("gradcam", model, layer=layer)
    ours = core.to_saliency(ex(x, y))
    # pytorch-grad-cam calls loss.backward(), leaving .grad on the model: give it its own copy of the shared fixture
    name = next(n for n, m in model.named_modules() if m is ex.layer)
    model = copy.deepcopy(model)
    with GradCAM(model=model, target_layers=[model.get_submodule(name)]) as cam:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in y])).float()
    compared = 0
    for i in range(len(x)):
        if ref[i].max() > 0 and ours[i].max() > 0:
            assert pearson(ours[i], ref[i]) >= 0.99, i
            compared += 1
        else:
            assert ref[i].max() == 0 and ours[i].max() == 0      # both all-zero (ReLU removed everything)
    assert compared >= len(x) // 2


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("name", ["gradient", "gradcam"])
@pytest.mark.parametrize("model_name", ["shapes/resnet_s", "shapes/vgg_s"])
def test_batch_invariance_and_determinism(name, model_name, embedded, shapes_batch):
    model = embedded[model_name]
    x, y, _ = shapes_batch
    full = methods.create(name, model, batch_size=12)(x, y)
    for i in (0, 5, 11):
        alone = methods.create(name, model, batch_size=1)(x[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(alone, full[i:i + 1], rtol=1e-4, atol=1e-6)
    chunked = methods.create(name, model, batch_size=5)(x, y)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)
    assert torch.equal(methods.create(name, model, batch_size=12)(x, y), full)


def _state(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    g, = torch.autograd.grad(out.sum(), x)
    return out.detach(), g, sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                                for m in model.modules())


@pytest.mark.parametrize("name", ["gradient", "gradcam"])
def test_hooks_never_leak(name, embedded, shapes_batch):
    model = embedded["shapes/vgg_s"]
    x, y, _ = shapes_batch
    before = _state(model, x)
    methods.create(name, model)(x, y)
    after = _state(model, x)
    with pytest.raises(ValueError, match="out of range"):
        methods.create(name, model)(x, 99)            # raises inside the hooked forward pass
    after_error = _state(model, x)
    for a, b, c in zip(before, after, after_error):
        assert (torch.equal(a, b) and torch.equal(a, c)) if isinstance(a, torch.Tensor) else a == b == c == 0
    assert all(p.grad is None for p in model.parameters())


def test_output_shapes_and_devices(embedded, shapes_batch):
    x, y, _ = shapes_batch
    assert methods.create("gradient", embedded["shapes/resnet_s"])(x, y).shape == x.shape
    assert methods.create("gradcam", embedded["shapes/resnet_s"])(x, y).shape == (12, 1, 64, 64)


def test_bad_input_and_unknown_names(embedded):
    m = embedded["shapes/resnet_s"]
    with pytest.raises(ValueError, match="did you mean"):
        methods.create("grad_cam", m)
    with pytest.raises(ValueError, match="unknown layer"):
        methods.create("gradcam", m, layer="layer7")
    with pytest.raises(ValueError, match="takes no layer"):
        methods.create("gradient", m, layer="layer3")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        methods.create("gradcam", m)(torch.rand(2, 3, 64, 64) * 3, 0)
    with pytest.raises(ValueError, match="2 images"):
        methods.create("gradcam", m)(torch.rand(2, 3, 64, 64), [1, 2, 3])
    with pytest.raises(ValueError, match="conv"):
        methods.create("gradcam", m, layer="fc")(torch.rand(2, 3, 64, 64), 0)
    m.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            methods.create("gradient", m)
    finally:
        m.eval()


def test_registry_lists_only_implemented_methods():
    for name, cls in methods.METHODS.items():
        assert cls.name == name and not getattr(cls.attribute, "__isabstractmethod__", False)
