"Max-/Avg-Sensitivity (nbs/31_metrics_robustness): conformance with Quantus 0.6.0, hand values, invariances, errors."
import copy, numpy as np, pytest, torch
from saliency_lab import core
from saliency_lab.methods import create
from saliency_lab.metrics.robustness import (avg_sensitivity, max_sensitivity, sensitivities, sensitivity_noise)


@pytest.fixture(scope="module")
def setup(embedded, shapes_batch):
    model = embedded["shapes/resnet_s"]
    x, _, _ = shapes_batch
    x = x[:4]
    return model, x, core.predict(model, x).argmax(1)


class ReplayNoise:
    "A Quantus perturb_func that adds our shared noise patterns z_k in order (step k → z_k) and clips to [0, 1] as we do."
    def __init__(self, z): self.z, self.k = z.flatten(1).numpy(), 0
    def __call__(self, arr, indices=None, **kwargs):
        out = np.clip(arr + self.z[self.k][None].astype(arr.dtype), 0, 1)
        self.k += 1
        return out


def quantus_scores(cls, model, x, y, explainer, post, n_samples=10, radius=0.2):
    import quantus
    z = sensitivity_noise(x, n_samples, radius, seed=0)
    def explain(model, inputs, targets, **kw):
        return post(explainer(torch.from_numpy(np.asarray(inputs)), torch.as_tensor(np.asarray(targets)))).numpy()
    # normalise=False, abs=False: Quantus compares the explanations exactly as explain_func returns them
    # (these are also its defaults for the sensitivity metrics); the noise is ours, replayed and clipped.
    metric = cls(nr_samples=n_samples, lower_bound=radius, perturb_func=ReplayNoise(z), normalise=False, abs=False,
                 disable_warnings=True, display_progressbar=False)
    return torch.tensor(np.asarray(metric(model=copy.deepcopy(model), x_batch=x.numpy(), y_batch=y.numpy(),
                                          a_batch=None, explain_func=explain, device="cpu", batch_size=len(x))),
                        dtype=torch.float32)


CASES = [("gradient", "maps"), ("gradcam", "maps"), ("gradient", "raw")]


@pytest.mark.parametrize("method,post", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_sensitivity_matches_quantus(setup, method, post):
    import quantus
    model, x, y = setup
    ex = create(method, model)
    f = core.to_saliency if post == "maps" else (lambda a: a)
    ours_max = max_sensitivity(model, x, y, ex, postprocess=None if post == "maps" else "raw")
    ours_avg = avg_sensitivity(model, x, y, ex, postprocess=None if post == "maps" else "raw")
    ref_max = quantus_scores(quantus.MaxSensitivity, model, x, y, ex, f)
    ref_avg = quantus_scores(quantus.AvgSensitivity, model, x, y, ex, f)
    assert torch.isfinite(ref_max).all() and (ref_max > 0.01).all()
    torch.testing.assert_close(ours_max, ref_max, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_avg, ref_avg, rtol=1e-4, atol=1e-5)
    assert (ours_avg <= ours_max + 1e-6).all()


def test_hand_values(setup):
    model, x, y = setup
    z = sensitivity_noise(x, 6, 0.1, seed=3)
    assert z.shape == (6, *x.shape[1:]) and z.abs().max() <= 0.1 and z.abs().max() > 0.09
    identity = lambda xs, t: xs
    s = sensitivities(model, x, y, identity, n_samples=6, radius=0.1, seed=3, postprocess="raw", relative=False, clip=False)
    torch.testing.assert_close(s, z.flatten(1).norm(dim=1).expand(len(x), -1))
    # relative: divided by ‖x‖; clipped: the change is clamp(x + z) − x
    s = sensitivities(model, x, y, identity, n_samples=6, radius=0.1, seed=3, postprocess="raw")
    ref = ((x[:, None] + z[None]).clamp(0, 1) - x[:, None]).flatten(2).norm(dim=2) / x.flatten(1).norm(dim=1)[:, None]
    torch.testing.assert_close(s, ref)
    l1 = sensitivities(model, x, y, identity, n_samples=6, radius=0.1, seed=3, postprocess="raw", relative=False,
                       clip=False, norm="l1")
    torch.testing.assert_close(l1, z.flatten(1).abs().sum(1).expand(len(x), -1))
    linf = max_sensitivity(model, x, y, identity, n_samples=6, radius=0.1, seed=3, postprocess="raw", relative=False,
                           clip=False, norm="linf")
    torch.testing.assert_close(linf, z.abs().max().expand(len(x)))
    const = lambda xs, t: torch.ones(len(xs), 1, *xs.shape[-2:])
    assert (max_sensitivity(model, x, y, const, postprocess="raw") == 0).all()
    zero = lambda xs, t: torch.zeros(len(xs), 1, *xs.shape[-2:])
    assert max_sensitivity(model, x, y, zero, postprocess="raw").isnan().all()     # ratio undefined → NaN


def test_batch_invariance_and_determinism(setup):
    model, x, y = setup
    ex = create("gradcam", model)
    full = sensitivities(model, x, y, ex, n_samples=5, batch_size=64)
    alone = torch.cat([sensitivities(model, x[i:i + 1], y[i:i + 1], ex, n_samples=5, batch_size=7) for i in (2, 0)])
    torch.testing.assert_close(alone, full[[2, 0]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sensitivities(model, x, y, ex, n_samples=5, batch_size=13), full, rtol=1e-4, atol=1e-5)
    again = sensitivities(model, x, y, ex, n_samples=5, batch_size=64)
    assert torch.equal(again, full)
    other = sensitivities(model, x, y, ex, n_samples=5, batch_size=64, seed=1)
    assert not torch.allclose(other, full)
    assert full.shape == (4, 5) and full.dtype == torch.float32 and (full >= 0).all()


def test_one_explainer_call_per_chunk(setup):
    model, x, y = setup
    calls = []
    def ex(xs, t):
        calls.append(len(xs)); return xs
    sensitivities(model, x, y, ex, n_samples=10, batch_size=25, postprocess="raw")   # 2 images (22 inputs) per call
    assert calls == [22, 22]
    calls.clear(); sensitivities(model, x, y, ex, n_samples=10, batch_size=5, postprocess="raw")   # at least 1 image
    assert calls == [11] * 4


def test_bad_input(setup):
    model, x, y = setup
    ex = lambda xs, t: xs
    bad = [dict(norm="l3"), dict(n_samples=0), dict(n_samples=2.5), dict(radius=0), dict(radius=float("nan")),
           dict(postprocess="minmax"), dict(postprocess=3), dict(batch_size=0)]
    for kw in bad:
        with pytest.raises(ValueError): max_sensitivity(model, x, y, ex, **kw)
    with pytest.raises(ValueError, match="callable"): max_sensitivity(model, x, y, "gradient")
    with pytest.raises(ValueError, match="one row per image"): max_sensitivity(model, x, y, lambda xs, t: xs[:1])
    with pytest.raises(ValueError, match="NaN"): max_sensitivity(model, x, y, lambda xs, t: xs * float("nan"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"): max_sensitivity(model, x * 2, y, ex)
    with pytest.raises(ValueError, match="target"): max_sensitivity(model, x, y[:2], ex)
    train = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="train mode"): max_sensitivity(train, x, y, ex)
    # without clipping our explainers refuse the perturbed images
    with pytest.raises(ValueError, match=r"\[0, 1\]"): max_sensitivity(model, x, y, create("gradient", model), clip=False)
