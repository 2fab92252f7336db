"""metrics.meta: rank statistics against scipy and hand computations; label flips and recovery on a toy model."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from scipy.stats import kendalltau, pointbiserialr, spearmanr

from saliency_lab import segments as seg
from saliency_lab.metrics.meta import (baseline_test, internal_consistency, inter_method_reliability,
                                       kendall_tau_matrix, label_flip_rate, map_similarity, matrix_summary,
                                       segment_recovery)

torch.set_num_threads(1)


def test_kendall_tau_matrix_vs_scipy():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 5, size=(6, 9)).astype(float)            # many ties: τ-b
    v[2, 4] = np.nan; v[5, [0, 7]] = np.nan                       # missing methods
    df = pd.DataFrame(v, index=[f"s{i}" for i in range(6)], columns=[f"m{j}" for j in range(9)])
    K = kendall_tau_matrix(df)
    ref = np.array([[kendalltau(v[a], v[b], nan_policy="omit")[0] for b in range(6)] for a in range(6)])
    np.testing.assert_allclose(K.to_numpy(), ref, rtol=1e-12, atol=1e-12)
    assert list(K.index) == list(df.index) == list(K.columns)
    # direction of "better" does not matter; a reversed setting has τ = −1
    np.testing.assert_allclose(kendall_tau_matrix(-df).to_numpy(), ref, atol=1e-12)
    two = kendall_tau_matrix(pd.DataFrame([[1, 2, 3, 4], [4, 3, 2, 1]]))
    assert two.iloc[0, 1] == pytest.approx(-1.0)
    m, s = matrix_summary(K)
    off = ref[~np.eye(6, dtype=bool)]
    assert (m, s) == pytest.approx((off.mean(), off.std()))


def test_internal_consistency_vs_scipy():
    rng = np.random.default_rng(1)
    n = 30
    base = rng.random(n)
    df = pd.DataFrame({"mean+pixel": base + 0.1 * rng.random(n), "blur+pixel": base + 0.5 * rng.random(n),
                       "mean+region": -base + rng.random(n), "method": np.repeat(["a", "b", "c"], 10)})
    ic = internal_consistency(df, groups="method")
    for p, q in [("mean+pixel", "blur+pixel"), ("blur+pixel", "mean+region")]:
        ref = np.mean([spearmanr(df.loc[df.method == g, p], df.loc[df.method == g, q])[0] for g in "abc"])
        assert ic.loc[p, q] == pytest.approx(ref, abs=1e-12) and ic.loc[q, p] == pytest.approx(ref, abs=1e-12)
    assert (np.diag(ic) == 1).all()
    flat = internal_consistency(df.drop(columns="method"))
    assert flat.loc["mean+pixel", "mean+region"] == pytest.approx(spearmanr(df["mean+pixel"], df["mean+region"])[0])
    aligned = internal_consistency(df.drop(columns="method"), higher_is_better={"mean+region": False})
    assert aligned.loc["mean+pixel", "mean+region"] == pytest.approx(-flat.loc["mean+pixel", "mean+region"])
    # NaN rows are dropped pairwise
    d2 = df.drop(columns="method").copy(); d2.iloc[3, 0] = np.nan
    r = internal_consistency(d2).loc["mean+pixel", "blur+pixel"]
    keep = np.arange(n) != 3
    assert r == pytest.approx(spearmanr(d2["mean+pixel"][keep], d2["blur+pixel"][keep])[0])


def test_inter_method_reliability_vs_scipy():
    rng = np.random.default_rng(2)
    n = 50
    ins = rng.random(n)
    dele = 1 - ins + 0.4 * rng.random(n)
    ad = rng.random(n) + 0.2 * ins
    pg = (ins + rng.random(n) > 1.0).astype(float)
    groups = np.tile(["gradcam", "rise"], n // 2)
    df = pd.DataFrame({"insertion": ins, "deletion": dele, "average_drop": ad, "pointing_game": pg})
    R = inter_method_reliability(df, groups=groups)
    assert list(R.columns) == ["gradcam", "rise"] and len(R) == 6
    for g in ("gradcam", "rise"):
        s = groups == g
        assert R.loc["insertion & deletion", g] == pytest.approx(spearmanr(ins[s], dele[s])[0], abs=1e-12)
        assert R.loc["deletion & average_drop", g] == pytest.approx(spearmanr(dele[s], ad[s])[0], abs=1e-12)
        assert R.loc["insertion & pointing_game", g] == pytest.approx(pointbiserialr(pg[s], ins[s])[0], abs=1e-12)
        assert R.loc["average_drop & pointing_game", g] == pytest.approx(pointbiserialr(pg[s], ad[s])[0], abs=1e-12)
    # sign alignment: lower-is-better metrics are negated, so insertion & deletion turns positive
    A = inter_method_reliability(df, higher_is_better={"deletion": False, "average_drop": False})
    assert A.loc["insertion & deletion", "all"] == pytest.approx(-spearmanr(ins, dele)[0], abs=1e-12)
    assert A.loc["insertion & deletion", "all"] > 0.5
    assert A.loc["average_drop & pointing_game", "all"] == pytest.approx(-pointbiserialr(pg, ad)[0], abs=1e-12)
    # forcing Spearman on the binary metric gives scipy's Spearman
    S = inter_method_reliability(df, kind="spearman")
    assert S.loc["insertion & pointing_game", "all"] == pytest.approx(spearmanr(ins, pg)[0], abs=1e-12)


def test_map_similarity_hand():
    g = torch.Generator().manual_seed(0)
    a, d = torch.rand(4, 6, 6, generator=g), torch.rand(4, 6, 6, generator=g)
    c = a.clone(); c[1] = 0.5                                           # one constant map: left out of that pair's mean
    S = map_similarity({"a": a, "b": 3 * a - 1, "c": c, "d": d})
    ref = np.mean([np.corrcoef(a[i].flatten(), d[i].flatten())[0, 1] for i in range(4)])
    assert S.loc["a", "d"] == pytest.approx(ref) and S.loc["d", "a"] == pytest.approx(ref)
    assert S.loc["a", "b"] == pytest.approx(1.0)
    assert S.loc["c", "d"] == pytest.approx(np.mean([np.corrcoef(a[i].flatten(), d[i].flatten())[0, 1]
                                                     for i in (0, 2, 3)]))
    per = map_similarity({"a": a, "d": d}, reduce="none")
    assert per.shape == (2, 2, 4)
    # batch invariance: one image alone gives its own column
    one = map_similarity({"a": a[2:3], "d": d[2:3]})
    assert one.loc["a", "d"] == pytest.approx(per[0, 1, 2].item())


def test_baseline_test_hand():
    df = pd.DataFrame({"gradcam": [0.9, 0.5, 0.8, 0.7], "gradient": [0.6, 0.6, 0.2, 0.3],
                       "uniform": [0.1, 0.7, 0.1, 0.3], "canny": [0.2, 0.1, 0.3, 0.2]}, index=list("ABCD"))
    bt = baseline_test(df)
    assert bt["uniform_place"].tolist() == [1, 4, 1, 2]
    assert bt["canny_place"].tolist() == [2, 1, 3, 1]
    assert bt["pass"].tolist() == [True, False, False, False]
    assert bt["bottom"].tolist() == [True, False, False, False]   # D: uniform ties gradient → not strictly below it
    tied = baseline_test(pd.DataFrame({"m": [0.5, 0.5], "uniform": [0.1, 0.2], "canny": [0.1, 0.1]}))
    assert tied["bottom"].tolist() == [True, True] and tied["pass"].tolist() == [False, False]
    lower = baseline_test(-df, higher_is_better=False)
    pd.testing.assert_frame_equal(lower, bt)
    assert bt["pass"].sum() == 1


class Quarter(nn.Module):
    "Class 1 iff the mean of channel 0 over the top-left 4×4 quarter (segment 0 of a 2×2 grid on 8×8) exceeds 0.5."
    def forward(self, x):
        v = x[:, 0, :4, :4].mean((1, 2))
        return torch.stack([torch.zeros_like(v), 40 * (v - 0.5)], 1)


def _toy():
    model = Quarter().eval()
    x = torch.full((3, 3, 8, 8), 0.4)
    d = torch.zeros_like(x)
    d[:, :, :4, :4] = 0.2                                           # the perturbation that matters (segment 0)
    d[:, :, 4:, 4:] = 0.5 * torch.sign(torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)))  # segment 3
    d[:, :, :4, 4:] = 0.05                                          # segment 1: small, irrelevant
    x_adv = (x + d).clamp(0, 1)
    x_adv[2] = x[2] + 0.05 * (x_adv[2] - x[2])                      # image 2: the attack failed
    return model, x, x_adv, seg.grid_segments(x, 2)


def _pointing(segment):
    "An explainer whose attribution is 1 on one segment, 0 elsewhere."
    def ex(x, t):
        a = torch.zeros(len(x), 1, *x.shape[-2:])
        r, c = divmod(segment, 2)
        a[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1
        return a
    return ex


def test_label_flip_rate_toy():
    model, x, x_adv, g = _toy()
    assert (model(x).argmax(1) == 0).all() and model(x_adv).argmax(1).tolist() == [1, 1, 0]
    # norm ranking: segment 3 (largest), 0, 1, 2 → flips from k = 2
    norm = label_flip_rate(model, x, x_adv, g, [1, 2, 3, 4], explainer="norm")
    assert norm[:2].tolist() == [[0, 1, 1, 1]] * 2 and norm[2].isnan().all()
    right = label_flip_rate(model, x, x_adv, g, 1, explainer=_pointing(0))
    assert right[:2].tolist() == [1, 1] and right[2].isnan()
    wrong = label_flip_rate(model, x, x_adv, g, [1, 0.5, 0.75, 1.0], explainer=_pointing(2))
    # pointing at segment 2: then ties in label order 0, 1, 3 → k=1: {2}; 50 %: {2, 0}; 75 %: {2, 0, 1}; 100 %: all
    assert wrong[:2].tolist() == [[0, 1, 1, 1]] * 2
    # a precomputed attribution gives the same; flip='adversarial' agrees here (2 classes)
    attr = _pointing(0)(x_adv, None)
    torch.testing.assert_close(label_flip_rate(model, x, x_adv, g, 1, attr=attr), right, equal_nan=True)
    torch.testing.assert_close(label_flip_rate(model, x, x_adv, g, 1, attr=attr, flip="adversarial"), right, equal_nan=True)
    # batch invariance
    torch.testing.assert_close(label_flip_rate(model, x[1:2], x_adv[1:2], g[1:2], [1, 2, 3, 4], explainer="norm"), norm[1:2])
    # the gradient of the toy model is non-zero only in segment 0
    def grad(xb, tb):
        xb = xb.clone().requires_grad_(True)
        model(xb).gather(1, tb[:, None]).sum().backward()
        return xb.grad
    assert label_flip_rate(model, x, x_adv, g, 1, explainer=grad)[:2].tolist() == [1, 1]


def test_segment_recovery_toy():
    model, x, x_adv, g = _toy()
    # k = 2 keeps segments 3 and 0 (largest norms): flips; an explainer pointing at 0 recovers 1 of 2
    r = segment_recovery(model, x, x_adv, g, 2, explainer=_pointing(0))
    assert r[:2].tolist() == [0.5, 0.5] and r[2].isnan()
    # k = 3 keeps 3, 0, 1; pointing at 2 (then 0, 1 by label order) recovers 0 and 1: 2 of 3
    assert segment_recovery(model, x, x_adv, g, 3, explainer=_pointing(2))[:2].tolist() == pytest.approx([2 / 3] * 2)
    # k = 1 keeps only segment 3, which does not flip: NaN unless require_flip=False
    assert segment_recovery(model, x, x_adv, g, 1, explainer=_pointing(3)).isnan().all()
    assert segment_recovery(model, x, x_adv, g, 1, explainer=_pointing(3), require_flip=False).tolist() == [1, 1, 1]
    # attr of the refined adversary
    x_loc = seg.localize(x, x_adv, g, 2)
    torch.testing.assert_close(segment_recovery(model, x, x_adv, g, 2, attr=_pointing(0)(x_loc, None)), r, equal_nan=True)


def test_bad_input():
    model, x, x_adv, g = _toy()
    with pytest.raises(ValueError, match="at least 2 rows"):
        kendall_tau_matrix(pd.DataFrame([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="must be a DataFrame"):
        kendall_tau_matrix("table")
    with pytest.raises(ValueError, match="different lengths"):
        internal_consistency({"a": [1, 2, 3], "b": [1, 2]})
    with pytest.raises(ValueError, match="one label per row"):
        internal_consistency({"a": [1, 2, 3], "b": [1, 2, 4]}, groups=["x", "y"])
    with pytest.raises(ValueError, match="unknown columns"):
        inter_method_reliability({"a": [1, 2, 3], "b": [1, 2, 4]}, higher_is_better={"c": False})
    with pytest.raises(ValueError, match="needs a binary"):
        inter_method_reliability({"a": [1, 2, 3], "b": [1, 2, 4]}, kind="pointbiserial")
    with pytest.raises(ValueError, match="same shape"):
        map_similarity({"a": torch.rand(2, 4, 4), "b": torch.rand(2, 5, 4)})
    with pytest.raises(ValueError, match="at least 2 methods"):
        map_similarity({"a": torch.rand(2, 4, 4)})
    with pytest.raises(ValueError, match="not columns"):
        baseline_test(pd.DataFrame({"a": [1, 2], "b": [2, 1]}))
    with pytest.raises(ValueError, match="positive int"):
        label_flip_rate(model, x, x_adv, g, 0, explainer="norm")
    with pytest.raises(ValueError, match="only"):
        label_flip_rate(model, x, x_adv, g, 5, explainer="norm")
    with pytest.raises(ValueError, match="same shape"):
        label_flip_rate(model, x, x_adv[:2], g, explainer="norm")
    with pytest.raises(ValueError, match="explainer must be a callable"):
        label_flip_rate(model, x, x_adv, g, 1)
    with pytest.raises(ValueError, match="callable or 'norm'"):
        label_flip_rate(model, x, x_adv, g, 1, explainer="lime")
    with pytest.raises(ValueError, match="flip must be"):
        label_flip_rate(model, x, x_adv, g, 1, flip="any")
    with pytest.raises(ValueError, match="attr must be"):
        label_flip_rate(model, x, x_adv, g, 1, attr=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="needs an explainer"):
        segment_recovery(model, x, x_adv, g, 1, explainer="norm")
    with pytest.raises(ValueError, match="explainer must be a callable"):
        segment_recovery(model, x, x_adv, g, 1)
    with pytest.raises(ValueError, match="positive integer"):
        segment_recovery(model, x, x_adv, g, 0.5, explainer=_pointing(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        label_flip_rate(model, x, x_adv + 1, g, 1, explainer="norm")
