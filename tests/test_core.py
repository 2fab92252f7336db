import warnings
import numpy as np, pytest, torch, torch.nn as nn
from saliency_lab import core


def test_to_saliency_reductions_and_norms():
    a = torch.randn(3, 3, 5, 7)
    s = core.to_saliency(a)
    ref = a.amax(1)
    lo = ref.flatten(1).min(1).values[:, None, None]; hi = ref.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(s, (ref - lo) / (hi - lo))
    assert s.shape == (3, 5, 7) and s.min() >= 0 and s.max() <= 1
    s = core.to_saliency(a, reduce="abs_max", norm="max")
    torch.testing.assert_close(s, a.abs().amax(1) / a.abs().amax((1, 2, 3))[:, None, None])
    s = core.to_saliency(a, reduce="mean_abs", norm="none")
    torch.testing.assert_close(s, a.abs().mean(1))
    s = core.to_saliency(a, reduce="sum", norm="none", positive=True)
    torch.testing.assert_close(s, a.clamp(min=0).sum(1))
    # "max" clips negative values to zero
    s = core.to_saliency(torch.tensor([[[[-2.0, 1.0]]]]), norm="max")
    torch.testing.assert_close(s, torch.tensor([[[0.0, 0.5]]]))


def test_to_saliency_constant_maps_become_zeros_with_warning():
    a = torch.randn(3, 1, 4, 4); a[1] = 2.5
    with pytest.warns(UserWarning, match="constant"):
        s = core.to_saliency(a)
    assert torch.isfinite(s).all() and (s[1] == 0).all() and s[0].max() == 1


def test_to_saliency_is_per_image():
    a = torch.randn(6, 3, 8, 8) * torch.arange(1, 7).view(6, 1, 1, 1)
    torch.testing.assert_close(core.to_saliency(a)[4:5], core.to_saliency(a[4:5]))


@pytest.mark.parametrize("bad, msg", [(torch.randn(2, 8, 8), "rank"), (torch.full((2, 1, 3, 3), float("nan")), "NaN"),
                                      ("no", "tensor")])
def test_to_saliency_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg if msg != "rank" else None):
        core.to_saliency(bad if msg != "rank" else torch.randn(8))


def test_to_saliency_bad_options():
    with pytest.raises(ValueError, match="reduce"): core.to_saliency(torch.rand(1, 1, 2, 2), reduce="median")
    with pytest.raises(ValueError, match="norm"): core.to_saliency(torch.rand(1, 1, 2, 2), norm="zscore")


class Lin(nn.Module):
    def __init__(self): super().__init__(); self.fc = nn.Linear(12, 5)
    def forward(self, x): return self.fc(x.flatten(1))


def test_targets():
    m = Lin().eval(); x = torch.rand(4, 3, 2, 2)
    logits = m(x)
    assert core.resolve_target(m, x, "pred").tolist() == logits.argmax(1).tolist()
    assert core.resolve_target(m, x, "least").tolist() == logits.argmin(1).tolist()
    assert core.resolve_target(m, x, "second").tolist() == logits.argsort(1, descending=True)[:, 1].tolist()
    assert core.resolve_target(m, x, 2).tolist() == [2] * 4
    assert core.resolve_target(m, x, torch.tensor([0, 1, 2, 3])).tolist() == [0, 1, 2, 3]
    assert core.resolve_target(m, x, "label", labels=np.array([4, 3, 2, 1])).tolist() == [4, 3, 2, 1]


@pytest.mark.parametrize("target, msg", [([1, 2, 3], "4 images"), (torch.tensor([[1, 2], [3, 4]]), "shape"),
                                         ("largest", "unknown target rule"), ("label", "labels="),
                                         (1.5, "int"), (torch.tensor([0.0, 1, 2, 3]), "integer"), (-1, r"\[0")])
def test_target_errors(target, msg):
    m = Lin().eval()
    with pytest.raises(ValueError, match=msg):
        core.resolve_target(m, torch.rand(4, 3, 2, 2), target)


def test_layer_lookup_and_suggestions(resnet18):
    assert core.get_layer(resnet18, "layer4.1") is resnet18.net.layer4[1]
    assert core.get_layer(resnet18, "net.layer4.1") is resnet18.net.layer4[1]
    with pytest.raises(ValueError, match=r"Close matches: \['layer4.1"):
        core.get_layer(resnet18, "layer4.1.conv9")
    with pytest.raises(ValueError, match="not part of the model"):
        core.get_layer(resnet18, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="dotted name"):
        core.get_layer(resnet18, 3)


@pytest.mark.parametrize("x, msg", [(torch.rand(3, 4, 4), r"x\[None\]"), (torch.rand(1, 3, 4, 4) + 1, r"\[0, 1\]"),
                                    (torch.zeros(0, 3, 4, 4), "empty"), (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "float")])
def test_check_images(x, msg):
    with pytest.raises(ValueError, match=msg):
        core.check_images(x)


def test_check_model_train_mode():
    with pytest.raises(ValueError, match="eval"):
        core.check_model(Lin().train())


def test_batched_and_predict_chunking():
    m = Lin().eval(); x = torch.rand(11, 3, 2, 2)
    for bs in (1, 3, 11, 100):
        torch.testing.assert_close(core.predict(m, x, batch_size=bs), m(x).detach())
    with pytest.raises(ValueError, match="batch_size"):
        list(core.chunks(5, 0))


def test_shared_noise_is_seeded_and_identical_across_images():
    x = torch.zeros(3, 3, 4, 4)
    a, b = core.shared_noise(x, 5, seed=3), core.shared_noise(x[:1], 5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, core.shared_noise(x, 5, seed=4))
