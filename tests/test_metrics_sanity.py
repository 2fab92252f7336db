"""metrics.sanity: the model-parameter randomisation test against Quantus 0.6.0 MPRT, scipy and scikit-image."""
import copy
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from saliency_lab import methods
from saliency_lab.metrics.sanity import (hog_similarity, randomizable_layers, randomization_test, randomize_layer,
                                         randomized_models, spearman_rows, ssim_similarity)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(shapes_batch, embedded):
    x, y, _ = shapes_batch
    return embedded["shapes/resnet_s"], x[:4]


def _gradcam_map(model, x, t):
    "Grad-CAM attribution [B, 1, H, W] as numpy — the explanation both implementations compare."
    return methods.create("gradcam", model)(torch.as_tensor(x), torch.as_tensor(t)).numpy()


@pytest.mark.parametrize("order,mode", [("top_down", "cascading"), ("independent", "independent")])
def test_matches_quantus_mprt(setup, order, mode):
    """Quantus 0.6.0 MPRT vs ours, matched: the same layers (every module with reset_parameters, top first), the
    same re-initialisation (reset_parameters after torch.manual_seed(seed + 1) in Quantus = manual_seed(seed) here,
    so Quantus seed=42 ↔ ours seed=43), the same explanation (Grad-CAM at the default layer, one channel, so our
    signed channel sum is the map itself) and the same similarity (Spearman of the flattened maps).
    normalise=False, abs=False in Quantus: no per-batch normalisation (Spearman would ignore it anyway)."""
    quantus = pytest.importorskip("quantus")
    model, x = setup
    t = model(x).argmax(1)
    a0 = _gradcam_map(model, x, t)
    metric = quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, layer_order=order, seed=42,
                          abs=False, normalise=False, disable_warnings=True)
    q = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=a0,
               explain_func=lambda model, inputs, targets, **kw: _gradcam_map(model, inputs, targets),
               softmax=False, device="cpu", batch_size=64)
    q = {k: np.asarray(v, dtype=float) for k, v in q.items() if k != "original"}
    # Quantus walks the layers bottom-up in independent mode (top-down only when cascading): give ours that order
    layers = randomizable_layers(model)[::-1] if mode == "independent" else None
    ours = randomization_test(model, x, t, "gradcam", layers=layers, mode=mode, similarity="spearman", seed=43)
    assert [f"net.{n}" for n in ours.layers] == list(q)                     # same layers, same order
    qv = np.stack(list(q.values()), 1)                                          # [B, L]
    ov = ours["spearman"].double().numpy()
    assert np.array_equal(np.isnan(qv), np.isnan(ov))
    np.testing.assert_allclose(ov, qv, atol=1e-5, equal_nan=True)
    assert np.nanstd(qv) > 0.05                                                  # not a degenerate comparison


def test_caller_model_untouched(setup):
    model, x = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    randomization_test(model, x, "pred", "gradcam", layers=["fc", "layer3"], seed=0)
    randomization_test(model, x, "pred", "gradient", layers=["layer1"], mode="independent", init="normal")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or
                   getattr(m, "_full_backward_hooks", None) for m in model.modules())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)                              # fork_rng: caller's RNG untouched

    def failing(m):                                                              # an explainer that breaks at step 2
        ex = methods.create("gradcam", m)
        calls = failing.calls = getattr(failing, "calls", 0) + 1
        if calls == 3: raise RuntimeError("boom")
        return ex
    with pytest.raises(RuntimeError):
        randomization_test(model, x, "pred", failing, layers=["fc", "layer3", "layer2"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_similarities_match_references():
    from skimage.feature import hog
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g)
    b = (a + 0.5 * torch.rand(3, 32, 32, generator=g)).clamp(0, 1)
    b[0, :8] = 0.3                                                               # ties
    ref = [spearmanr(a[i].flatten(), b[i].flatten())[0] for i in range(3)]
    np.testing.assert_allclose(spearman_rows(a, b).numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(ssim_similarity(a, b).numpy(),
                               [structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=1.0)
                                for i in range(3)], rtol=1e-10)
    np.testing.assert_allclose(hog_similarity(a, b).numpy(),
                               [np.corrcoef(hog(a[i].double().numpy()), hog(b[i].double().numpy()))[0, 1]
                                for i in range(3)], rtol=1e-8)
    assert spearman_rows(a, torch.zeros(3, 32, 32)).isnan().all()


def test_hand_computed_linear():
    "Gradient of a linear model = its weight row; after re-initialising the layer the similarity is the weights' rank correlation."
    class Lin(nn.Module):
        def __init__(self):
            super().__init__(); self.fc = nn.Linear(48, 3)
        def forward(self, x): return self.fc(x.flatten(1))
    torch.manual_seed(0)
    m = Lin().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    r = randomization_test(m, x, 2, "gradient", similarity=("spearman", "spearman_abs"), seed=5)
    w0 = m.fc.weight[2].detach().view(3, 16)
    w1 = randomize_layer(copy.deepcopy(m.fc), seed=5).weight[2].detach().view(3, 16)
    assert r["spearman"][:, 0].tolist() == pytest.approx([spearmanr(w0.sum(0), w1.sum(0))[0]] * 2, abs=1e-6)
    assert r["spearman_abs"][:, 0].tolist() == pytest.approx([spearmanr(w0.abs().sum(0), w1.abs().sum(0))[0]] * 2, abs=1e-6)


def test_batch_invariance_determinism_and_groups(setup):
    model, x = setup
    kw = dict(layers=["fc", ["layer3", "layer2"]], similarity=("spearman", "ssim", "hog"), seed=1)
    full = randomization_test(model, x, "pred", "gradient", **kw)
    assert full.layers == ["fc", "layer3+layer2"]
    one = randomization_test(model, x[2:3], "pred", "gradient", **kw)
    for s in full:
        torch.testing.assert_close(one[s][0], full[s][2], atol=1e-5, rtol=0, equal_nan=True)
    again = randomization_test(model, x, "pred", "gradient", **kw)
    for s in full: torch.testing.assert_close(again[s], full[s], equal_nan=True)
    other = randomization_test(model, x, "pred", "gradient", **{**kw, "seed": 2})
    assert not torch.allclose(other["spearman"], full["spearman"])
    df = full.to_frame()
    assert len(df) == 3 * 4 * 2 and set(df.similarity) == {"spearman", "ssim", "hog"}
    # maps are returned with the original first
    rm = randomization_test(model, x, "pred", "gradcam", layers=["fc"], similarity="ssim", return_maps=True)
    assert rm.maps.shape == (4, 2, 64, 64) and rm.maps.min() >= 0 and rm.maps.max() <= 1


def test_default_layers_and_normal_init(setup):
    model, _ = setup
    names = randomizable_layers(model)
    assert names[0] == "fc" and names[-1] == "conv1" and len(names) == 31
    steps = list(randomized_models(model, ["fc"], init="normal", std=0.01, seed=0))
    w = steps[0][1].net.fc.weight
    assert w.abs().max() <= 0.02 + 1e-7 and 0.004 < w.std() < 0.01


def test_bad_input(setup):
    model, x = setup
    with pytest.raises(ValueError, match="unknown similarity"):
        randomization_test(model, x, 0, "gradient", similarity="pearson")
    with pytest.raises(ValueError, match="mode must be"):
        randomization_test(model, x, 0, "gradient", mode="bottom_up")
    with pytest.raises(ValueError, match="init must be"):
        randomization_test(model, x, 0, "gradient", init="xavier")
    with pytest.raises(ValueError, match="unknown layer"):
        randomization_test(model, x, 0, "gradient", layers=["layer9"])
    with pytest.raises(ValueError, match="no sub-module with parameters"):
        randomization_test(model, x, 0, "gradient", layers=["layer1.0.relu"])
    with pytest.raises(ValueError, match="not an Explainer bound"):
        randomization_test(model, x, 0, methods.create("gradient", model))
    with pytest.raises(ValueError, match="unknown method"):
        randomization_test(model, x, 0, "gradientt")
    with pytest.raises(ValueError, match="rank 4"):
        randomization_test(model, x[0], 0, "gradient")
    with pytest.raises(ValueError, match="target has shape"):
        randomization_test(model, x, [0, 1], "gradient")
    with pytest.raises(ValueError, match="duplicates"):
        randomization_test(model, x, 0, "gradient", layers=["fc", "fc"])
