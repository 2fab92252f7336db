"Papermill smoke test of the SmoothGrad σ notebook (001 Figure 7) with tiny parameters."
import json
import numpy as np
import pandas as pd
from saliency_lab import cli

SIG = ["σ = 0.01", "σ = 0.1", "σ = 0.25", "σ = 0.5"]
REF = "Gradient (σ → 0)"
SETTINGS = ["shapes/vgg_s", "digits/dense_s"]


def test_papermill_smoke_perturb_smoothgrad_sigma(tmp_path):
    "Score, choice and pooled tables, the three figures and the index row are written; a rerun reuses the cache."
    params = {"settings": SETTINGS, "n_images": 4, "n_perturb": 3, "pool": 40, "n_samples": 4, "steps": 8,
              "n_boot": 50, "fig_per_dataset": 1, "batch_size": 16}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="perturb_smoothgrad_sigma", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "perturb_smoothgrad_sigma"
    sc = pd.read_csv(d / "figure7_scores.csv")
    assert list(sc.columns) == ["Setting", "Metric", "n", *SIG, REF]
    assert sc["Setting"].tolist() == [s for s in SETTINGS for _ in range(3)]
    assert sc["Metric"].tolist() == ["Del ↓", "Del ↓ (attacked)", "Perturb ↑"] * 2
    # Deletion on the first n_images; Perturb and Deletion (attacked) on the same, at most n_perturb, attacked images
    assert (sc.loc[sc.Metric == "Del ↓", "n"] == 4).all()
    att = sc[sc.Metric != "Del ↓"].groupby("Setting")["n"].agg(["min", "max"])
    assert (att["min"] == att["max"]).all() and att["max"].between(1, 3).all()
    assert sc[SIG + [REF]].notna().all().all() and ((sc[SIG + [REF]] >= 0) & (sc[SIG + [REF]] <= 100)).all().all()
    # the σ values give different maps, hence different scores
    assert (sc[SIG].max(axis=1) - sc[SIG].min(axis=1) > 0).all()
    ch = pd.read_csv(d / "figure7_choice.csv")
    assert list(ch.columns) == ["Setting", "Del ↓ σ*", "Del ↓ (attacked) σ*", "Perturb ↑ σ*", "n Del", "n Perturb"]
    # each reported choice is the best mean of the score table (lowest for Deletion, highest for Perturb)
    for _, r in ch.iterrows():
        for metric, pick in (("Del ↓", np.argmin), ("Del ↓ (attacked)", np.argmin), ("Perturb ↑", np.argmax)):
            row = sc[(sc.Setting == r.Setting) & (sc.Metric == metric)][SIG].to_numpy()[0]
            sigma, share = r[f"{metric} σ*"].split(" (")
            assert float(sigma) == [0.01, 0.1, 0.25, 0.5][pick(row)]
            assert 0 < float(share.rstrip(" %)")) <= 100
    po = pd.read_csv(d / "figure7_pooled.csv")
    counts = po[po.iloc[:, 1] == "settings selecting"]
    assert len(counts) == 3 and (counts[SIG].sum(axis=1) == 2).all()
    shares = po[po.iloc[:, 1] == "images selecting (%)"][SIG].sum(axis=1)
    assert np.allclose(shares, 100)
    for f in ("figure7_scores.md", "figure7_scores.tex", "figure7_choice.tex", "figure7_pooled.md", "figure7.png",
              "figure7.pdf", "figure7_auc.png", "figure7_curves.png", "perturb_smoothgrad_sigma.ipynb", "index.json",
              "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "figure7.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    assert "| 001 Perturb | Figure 7 | `nbs/experiments/perturb_smoothgrad_sigma.ipynb` |" in index
    assert "perturb_smoothgrad_sigma/figure7_choice.csv" in index
    nb = json.loads((d / "perturb_smoothgrad_sigma.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Figure 7: the paper's claims on our numbers" in text and "Perturb and the plain gradient" in text
    # five claims of the paper (two readings of the Deletion one) and the check against the plain gradient
    assert text.count("— **holds**") + text.count("— **does not hold**") == 6
    # a rerun finds every attack result, map and score in the cache and writes the same tables
    cached = sorted((cache / "scores").glob("*.pt")) + sorted((cache / "attack").glob("*.pt"))
    assert len(cached) == 2 * 5 + 2          # (4 σ + the reference) per setting, one attack scan per setting
    mtimes = [p.stat().st_mtime_ns for p in cached]
    cli.reproduce("quick", only="perturb_smoothgrad_sigma", out_root=out, cache_dir=cache, params=params, progress=False)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    pd.testing.assert_frame_equal(pd.read_csv(d / "figure7_scores.csv"), sc)
    pd.testing.assert_frame_equal(pd.read_csv(d / "figure7_choice.csv"), ch)
