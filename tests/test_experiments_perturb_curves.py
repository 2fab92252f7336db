"Papermill smoke test of the Perturb curves notebook (001 Figure 4, Table 5, Figures 6 and 12, FGSM vs PGD) with tiny parameters."
import json
import pandas as pd
import torch
from saliency_lab import cli, core, data, experiment, methods, models
from saliency_lab.metrics import curves

SETTINGS = ["shapes/vgg_s", "digits/dense_s"]
METHODS = ["gradcam", "uniform", "canny"]
PARAMS = {"settings": SETTINGS, "methods": METHODS, "n_images": 4, "steps": 4, "eps_levels": [1, 4], "n_pool": 8,
          "fig4_steps": 8, "batch_size": 16}
T5_COLS = ["Metric", "Monotonicity ↑", "Smoothness ↓", "Monotonicity ↑ (same images)", "Smoothness ↓ (same images)",
           "curves", "settings", "paper Monotonicity", "paper Smoothness"]


def test_papermill_smoke_perturb_curves(tmp_path):
    "Every table and figure is written and registered, the numbers are the library's, and a rerun reuses the cache."
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="perturb_curves", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    d = out / "perturb_curves"
    t5 = pd.read_csv(d / "table5.csv")
    assert list(t5.columns) == T5_COLS
    assert t5["Metric"].tolist() == ["Del", "Ins", "InsBlur", "Perturb (FGSM, ε = 1/255)"]
    assert t5.loc[:2, "Monotonicity ↑"].between(0, 1).all() and (t5.loc[:2, "Smoothness ↓"] >= 0).all()
    assert t5.loc[:2, "curves"].tolist() == [len(SETTINGS) * len(METHODS) * 4] * 3      # every image and map
    paper = experiment.paper_values("001_table5")
    assert t5["paper Monotonicity"].tolist() == paper["Monotonicity"].tolist() == [0.648, 0.671, 0.654, 0.967]

    # the per-setting numbers are the library's monotonicity / smoothness of curves recomputed here
    per = pd.read_csv(d / "table5_settings.csv").set_index("Setting")
    assert per.index.tolist() == SETTINGS
    assert [c for c in per.columns if "/" in c] == [f"{m} / {s}" for m in ("Del", "Ins", "InsBlur", "Perturb")
                                                    for s in ("Mono", "Smooth")]
    model = models.load_model("digits/dense_s")
    x, _, _ = data.load_batch(data.load_dataset("digits", split="val", n=4, seed=0))
    t = core.resolve_target(model, x, "pred")
    mono_del, smooth_blur = [], []
    for m in METHODS:
        sal = core.to_saliency(methods.create(m, model, batch_size=16)(x, t))
        mono_del.append(curves.curve_monotonicity(curves.deletion_curve(model, x, sal, t, steps=4, baseline="zero"),
                                                  decreasing=True))
        smooth_blur.append(curves.curve_smoothness(curves.insertion_curve(model, x, sal, t, steps=4, baseline="blur")))
    assert abs(per.loc["digits/dense_s", "Del / Mono"] - torch.cat(mono_del).mean().item()) < 1e-6
    assert abs(per.loc["digits/dense_s", "InsBlur / Smooth"] - torch.cat(smooth_blur).mean().item()) < 1e-5

    pgd = pd.read_csv(d / "pgd_ablation.csv").set_index("Setting")
    assert pgd.index.tolist() == SETTINGS
    assert list(pgd.columns) == ["FGSM success (%)", "PGD success (%)", "FGSM images", "PGD images", "PGD-only images",
                                 "Kendall τ", "best map FGSM", "best map PGD"]
    assert pgd[["FGSM success (%)", "PGD success (%)"]].stack().between(0, 100).all()
    assert (pgd["PGD images"] >= pgd["FGSM images"]).all()        # PGD's first iterate is FGSM (early stop)
    assert (pgd["PGD images"] - pgd["FGSM images"] == pgd["PGD-only images"]).all()
    assert (pgd["FGSM success (%)"] == 100 * pgd["FGSM images"] / PARAMS["n_pool"]).all()
    assert pgd["FGSM images"].tolist() == per["Perturb images"].tolist()
    assert pgd["Kendall τ"].dropna().between(-1, 1).all()
    # the Perturb curve count of Table 5 is the attacked images times the maps
    assert t5.loc[3, "curves"] == pgd["FGSM images"].sum() * len(METHODS)

    f6 = pd.read_csv(d / "figure6_12.csv")
    assert f6["ε"].tolist() == ["1/255", "4/255"]
    assert f6["attacked images"].between(0, 4 * len(SETTINGS)).all()
    assert f6["curves"].tolist() == (f6["attacked images"] * 1).tolist()      # one map (gradcam) in the ε sweep
    for f in ("table5.md", "table5.tex", "table5_settings.md", "pgd_ablation.tex", "figure6_12.md", "figure4.png",
              "figure4.pdf", "figure6.png", "figure6.pdf", "figure12.png", "figure12.pdf", "perturb_curves.ipynb",
              "index.json", "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "figure4.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    for item in ("Figure 4", "Table 5", "Figure 6", "Figure 12", "Ablation FGSM vs PGD (§4.1)"):
        assert f"| 001 Perturb | {item} | `nbs/experiments/perturb_curves.ipynb` |" in index, item
    nb = json.loads((d / "perturb_curves.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    for head in ("Table 5: the paper's claims", "Figures 6 and 12: the paper's claims", "FGSM vs PGD: the paper's claims"):
        assert head in text, head

    # a rerun finds maps, attacks and curves in the cache and writes the same tables
    before = {n: pd.read_csv(d / f"{n}.csv") for n in ("table5", "table5_settings", "pgd_ablation", "figure6_12")}
    cached = sorted(cache.glob("**/*.pt")) + sorted(cache.glob("maps/**/maps.f16"))
    assert len(list(cache.glob("curves/*.pt"))) >= len(SETTINGS) * len(METHODS) * 5
    mtimes = [p.stat().st_mtime_ns for p in cached]
    cli.reproduce("quick", only="perturb_curves", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert sorted(cache.glob("**/*.pt")) + sorted(cache.glob("maps/**/maps.f16")) == cached
    for name, df in before.items():
        pd.testing.assert_frame_equal(pd.read_csv(d / f"{name}.csv"), df)
