"Papermill smoke test of the three adversarial-plausibility notebooks (004 §6) with tiny parameters and one shared cache."
import json
import numpy as np
import pandas as pd
import torch
from saliency_lab import cli, experiment, models as Z, segments as seg
from saliency_lab.metrics import meta

MODELS = ["shapes/resnet_s", "shapes/dense_s"]
PARAMS = {"model_names": MODELS, "n_images": 12, "n_explain": 4, "n_recovery": 3, "n_grid": 4, "eps_grid": [0.1, 0.2],
          "step_grid": [0.02], "steps": 20, "ig_steps": 2, "n_samples": 2, "lime_samples": 8, "fractions": [0.5, 1.0],
          "n_examples": 2, "batch_size": 8, "explain_batch": 16}


def _source(nb_path):
    return "".join("".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"])


def test_papermill_smoke_plausibility(tmp_path):
    "Every table and figure is written and registered from one shared cache; the rates equal a direct computation; a rerun recomputes nothing."
    out, cache = tmp_path / "figs", tmp_path / "cache"
    run = lambda nb: cli.reproduce("quick", only=nb, out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    run("plausibility_attacks")
    a = out / "plausibility_attacks"
    t1 = pd.read_csv(a / "table1.csv").set_index("Model")
    assert t1.index.tolist() == MODELS and (t1["n"] == 12).all()
    S = experiment.plausibility_setting(model_names=MODELS, n_images=12, n_explain=4, n_recovery=3, n_grid=4, batch_size=8)
    atts = {}
    for m in MODELS:
        grid, atts[m] = experiment.plausibility_adversaries(S, Z.load_model(m), m, cache_dir=cache, eps_grid=[0.1, 0.2],
                                                            step_grid=[0.02], steps=20)        # read from the cache
        assert t1.loc[m, "# adversarial"] == int(atts[m]["success"].sum())
        assert int(grid.chosen.sum()) == 1 and len(grid) == 2
        assert len(list((cache / "attacks").glob("*.pt"))) == len(MODELS)            # the notebook's entries, reused
        assert atts[m]["x_adv"] is not None and len(atts[m]["explain_idx"]) == min(4, int(atts[m]["success"].sum()))
        assert (atts[m]["x_adv"] - atts[m]["x"]).abs().max() <= atts[m]["eps"] * 0.2164 + 1e-5   # |δ| ≤ ε·σ (largest σ)
    for f in ("table1.md", "table1.tex", "table4.csv", "table4_grid.csv", "figure11.png", "figure11.pdf", "claims.csv"):
        assert (a / f).exists(), f
    assert _source(a / "plausibility_attacks.ipynb").count("What the checks say") == 1
    assert pd.read_csv(a / "claims.csv")["holds"].isin([True, False]).all()

    run("plausibility_label_flip")
    d = out / "plausibility_label_flip"
    for f in ("table2.csv", "table3.csv", "table6.csv", "table7.csv", "table8.csv", "aggregations.csv", "figure1.png",
              "figure4.png", "figure5.pdf", "figure6.png", "figure6_rectangles_k.png", "figure7.png", "figure9.png",
              "figures5_7_rates.csv", "claims.csv"):
        assert (d / f).exists(), f
    t2 = pd.read_csv(d / "table2.csv")
    ours = t2[t2.iloc[:, 1] == "ours"].set_index("Model")
    assert list(ours.columns[1:]) == ["LIME", "IG", "Sal", "GBP", "Norm"] and ours.index.tolist() == MODELS
    rates = pd.read_csv(d / "figures5_7_rates.csv")
    assert np.allclose(rates["100%"], 100)          # the whole perturbation flips every (successful) adversary
    # Table 2's LIME and Norm values recomputed directly, with another chunk size
    m = MODELS[0]
    att = atts[m]
    x, xa = att["x"], att["x_adv"]
    t = att["adv_pred"][att["explain_idx"]]
    segs = {"slic": seg.slic_segments(xa, 16)}
    model = Z.load_model(m)
    sc = experiment.plausibility_scores(model, xa, segs, t, explainers=("LIME", "GBP"), ig_steps=2, n_samples=2,
                                        lime_samples=8, batch_size=5)
    lime = 100 * np.nanmean(meta.label_flip_rate(model, x, xa, segs["slic"], 3, scores=sc["LIME", "slic", "mean"]).numpy())
    gbp = 100 * np.nanmean(meta.label_flip_rate(model, x, xa, segs["slic"], 3, scores=sc["GBP", "slic", "mean_abs"]).numpy())
    norm = 100 * np.nanmean(meta.label_flip_rate(model, x, xa, segs["slic"], 3, explainer="norm").numpy())
    assert abs(ours.loc[m, "LIME"] - lime) < 1e-3 and abs(ours.loc[m, "GBP"] - gbp) < 1e-3 and abs(ours.loc[m, "Norm"] - norm) < 1e-3
    t6 = pd.read_csv(d / "table6.csv").set_index("Model")
    nseg = seg.num_segments(segs["slic"]).double()                  # Table 6 is the SLIC count of the explained adversaries
    assert t6.loc[m, "# segments"] == f"{nseg.mean():.3f} ± {nseg.std():.3f}" and t6.loc[m, "max"] == int(nseg.max())

    run("plausibility_recovery")
    r = out / "plausibility_recovery"
    for f in ("recovery.csv", "figure8.png", "figure13.pdf", "figure14.png", "claims.csv"):
        assert (r / f).exists(), f
    rec = pd.read_csv(r / "recovery.csv")
    assert len(rec) == len(MODELS) * 2 * 3 * 13 and (rec["n"] <= 3).all()
    for k in (1, 3, 5):
        sub = rec[(rec.k == k) & (rec.n > 0)]
        assert np.allclose(sub[[f"{j}/{k}" for j in range(k + 1)]].sum(1), 100, atol=0.2)   # rounded to 0.1

    index = (out / "INDEX.md").read_text()
    for nb, items in (("plausibility_attacks", ("Table 1", "Table 4", "Figure 11")),
                      ("plausibility_label_flip", ("Table 2", "Table 3", "Table 6", "Table 7", "Table 8", "Figure 1",
                                                   "Figure 4", "Figure 5", "Figure 6", "Figure 7", "Figure 9")),
                      ("plausibility_recovery", ("Figure 8", "Figure 13", "Figure 14"))):
        for item in items:
            assert f"| 004 Plausibility | {item} | `nbs/experiments/{nb}.ipynb` |" in index, (nb, item)
    for nb in (d / "plausibility_label_flip.ipynb", r / "plausibility_recovery.ipynb"):
        assert "Against the paper" in _source(nb) and "What the checks say" in _source(nb)

    # a rerun after an interruption reads every cache entry back and writes none
    entries = sorted(p for p in cache.rglob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in entries}
    for nb in ("plausibility_attacks", "plausibility_label_flip", "plausibility_recovery"):   # not the audio one (§5)
        run(nb)
    assert sorted(cache.rglob("*.pt")) == entries and all(p.stat().st_mtime_ns == before[p] for p in entries)
