import numpy as np, pytest, torch, torch.nn as nn
from saliency_lab import core, metrics


class Linear(nn.Module):
    "Logits are a fixed linear function of the pixels: probabilities are computable by hand."
    def __init__(self, d, k=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, k, generator=g))
    def forward(self, x): return x.flatten(1) @ self.w


def hand(x, s, w, t):
    X, S = x.reshape(len(x), -1).numpy().astype(np.float64), np.repeat(s.numpy()[:, None], x.shape[1], 1).reshape(len(x), -1)
    W = w.detach().numpy().astype(np.float64)
    def prob(z):
        z = z - z.max(1, keepdims=True); e = np.exp(z); return e / e.sum(1, keepdims=True)
    p = prob(X @ W)[np.arange(len(x)), t]; o = prob((X * S) @ W)[np.arange(len(x)), t]
    ad = np.maximum(p - o, 0) / p; ai = (p < o).astype(float); ag = np.maximum(o - p, 0) / (1 - p)
    return ad, ai, ag


def test_ad_ai_ag_against_hand_computation():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 4, 4); s = torch.rand(16, 4, 4); s[:4] = 1.0; s[4:6] = 0.0
    m = Linear(48).eval(); t = torch.randint(0, 4, (16,))
    ad, ai, ag = hand(x, s, m.w, t.numpy())
    np.testing.assert_allclose(metrics.average_drop(m, x, s, t).numpy(), ad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics.average_increase(m, x, s, t).numpy(), ai)
    np.testing.assert_allclose(metrics.average_gain(m, x, s, t).numpy(), ag, rtol=1e-4, atol=1e-6)
    both = metrics.classification_metrics(m, x, s, t, batch_size=5)
    np.testing.assert_allclose(both["average_drop"].numpy(), ad, rtol=1e-4, atol=1e-6)
    # an all-ones map leaves the image unchanged: no drop, no gain, no increase
    assert (metrics.average_drop(m, x[:4], s[:4], t[:4]) == 0).all()
    assert (metrics.average_gain(m, x[:4], s[:4], t[:4]) == 0).all()


def test_metrics_are_per_image_and_batch_invariant():
    torch.manual_seed(1)
    x = torch.rand(10, 3, 4, 4); s = torch.rand(10, 4, 4); m = Linear(48).eval()
    full = metrics.average_gain(m, x, s, "pred", batch_size=10)
    assert full.shape == (10,)
    torch.testing.assert_close(metrics.average_gain(m, x[3:4], s[3:4], "pred"), full[3:4])
    torch.testing.assert_close(metrics.average_gain(m, x, s, "pred", batch_size=3), full)


def test_target_rules_use_the_unmasked_prediction():
    torch.manual_seed(2)
    x = torch.rand(6, 3, 4, 4); s = torch.rand(6, 4, 4); m = Linear(48).eval()
    t = m(x).argmax(1)
    torch.testing.assert_close(metrics.average_drop(m, x, s, "pred"), metrics.average_drop(m, x, s, t))


@pytest.mark.parametrize("sal, msg", [(torch.rand(5, 4, 4), "shape"), (torch.rand(6, 4, 4) * 2, r"\[0, 1\]"),
                                      (torch.full((6, 4, 4), float("nan")), "NaN"), (torch.rand(6, 1, 4, 4), "shape")])
def test_bad_maps(sal, msg):
    m = Linear(48).eval()
    with pytest.raises(ValueError, match=msg):
        metrics.average_drop(m, torch.rand(6, 3, 4, 4), sal, 0)


def test_target_length_mismatch():
    with pytest.raises(ValueError, match="6 images"):
        metrics.average_gain(Linear(48).eval(), torch.rand(6, 3, 4, 4), torch.rand(6, 4, 4), [0, 1])
