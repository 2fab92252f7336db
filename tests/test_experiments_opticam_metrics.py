"Papermill smoke tests of the Opti-CAM insertion/deletion (Table 3, Figure 3) and more-metrics (Table 4) notebooks."
import json
import pandas as pd
from saliency_lab import cli

FAST = {"opticam": {"iterations": 5}}


def test_papermill_smoke_opticam_insertion_deletion(tmp_path):
    "Table 3 has I/D columns per model, scores in [0, 100], per-image scores, Figure 3, and INDEX rows."
    params = {"n_images": 3, "batch_size": 3, "steps": 8, "methods": ["fakecam", "gradcam", "scorecam", "opticam"],
              "transformers": ["shapes/vit_s"], "methods_t": ["gradcam", "transformer_attribution"],
              "method_kw": FAST, "n_figure": 2}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_insertion_deletion", out_root=out, cache_dir=cache, params=params,
                  progress=False)
    d = out / "opticam_insertion_deletion"
    t = pd.read_csv(d / "table3.csv")
    models = ["shapes/resnet_s", "shapes/vgg_s", "shapes/vit_s"]
    assert list(t.columns) == ["Method"] + [f"{m} / {c}" for m in models for c in ("I↑", "D↓")]
    assert t["Method"].tolist() == ["Fake-CAM", "Grad-CAM", "Score-CAM", "Opti-CAM", "TIBAV"]
    cnn = t.iloc[:4, 1:5]
    assert cnn.notna().all().all() and ((cnn >= 0) & (cnn <= 100)).all().all()
    # methods not run on a model are empty: TIBAV on the CNNs, Fake-CAM/Score-CAM/Opti-CAM on the ViT
    assert t.iloc[4, 1:5].isna().all() and t.iloc[[0, 2, 3], 5:7].isna().all().all()
    per = pd.read_csv(d / "table3_per_image.csv")
    assert len(per) == 3 * (4 * 2 + 2)
    # Table 3 is the mean of the per-image scores
    g = per[(per.model == "shapes/vgg_s") & (per.method == "gradcam")]
    assert abs(g["I↑"].mean() - t.loc[1, "shapes/vgg_s / I↑"]) < 1e-4
    # insertion from a blurred image and deletion to black differ: not the same curve read twice
    assert (per["I↑"] - per["D↓"]).abs().max() > 1
    cand = pd.read_csv(d / "figure3_candidates.csv")
    assert len(cand) == 6 and {"passes", "margin", "thresholds met", "I↑ scorecam", "D↓ opticam"} <= set(cand.columns)
    met = ((cand["I↑ scorecam"] > 90).astype(int) + (cand["D↓ scorecam"] < 10) + (cand["I↑ opticam"] < 70)
           + (cand["D↓ opticam"] > 15))
    assert (met == cand["thresholds met"]).all() and (cand["passes"] == (met == 4)).all()
    assert cand["thresholds met"].is_monotonic_decreasing          # the rows are ranked closest-first
    # each candidate's scores are the per-image scores of Table 3
    r = cand.iloc[0]
    sc = per[(per.model == r["model"]) & (per.image == r["image"]) & (per.method == "scorecam")]
    assert abs(sc["I↑"].iloc[0] - r["I↑ scorecam"]) < 1e-3
    man = json.loads((d / "manifest.json").read_text())["params"]
    assert man["steps"] == 8 and man["target"] == "pred" and man["deletion_baseline"] == "zero"
    for f in ("table3.md", "table3.tex", "figure3.png", "figure3.pdf", "opticam_insertion_deletion.ipynb", "index.json"):
        assert (d / f).exists(), f
    assert (d / "figure3.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    for item in ("Table 3", "Figure 3"):
        assert f"| 003 Opti-CAM | {item} | `nbs/experiments/opticam_insertion_deletion.ipynb` |" in index
    nb = json.loads((d / "opticam_insertion_deletion.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Table 3: the paper's claims on our numbers" in text


def test_papermill_smoke_opticam_more_metrics(tmp_path):
    "Table 4 has AOPC/MS/ADCC per model, values in range, ADCC parts consistent with the harmonic mean."
    params = {"n_images": 3, "batch_size": 3, "n_sensitivity": 2, "methods": ["gradcam", "layercam", "opticam"],
              "method_kw": FAST}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_more_metrics", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "opticam_more_metrics"
    t = pd.read_csv(d / "table4.csv")
    cols = ["AOPC↑", "MS↓", "ADCC↑", "AOPC p4↑"]
    assert list(t.columns) == ["Method"] + [f"{m} / {c}" for m in ("shapes/resnet_s", "shapes/vgg_s") for c in cols]
    assert t["Method"].tolist() == ["Grad-CAM", "Layer-CAM", "Opti-CAM"]
    assert t.iloc[:, 1:].notna().all().all()
    ms = t[[c for c in t.columns if c.endswith("MS↓")]]
    assert (ms > 0).all().all() and (ms < 10).all().all()
    adcc = t[[c for c in t.columns if c.endswith("ADCC↑")]]
    assert ((adcc > 0) & (adcc <= 100)).all().all()
    # different methods give different maps, so different AOPC
    assert t["shapes/resnet_s / AOPC↑"].nunique() > 1
    parts = pd.read_csv(d / "table4_adcc_parts.csv")
    assert list(parts.columns) == ["model", "method", "ADCC↑", "coherency↑", "complexity↓", "AD↓", "ADCC NaN"]
    # the harmonic mean is concave: the mean of per-image ADCCs is at most the harmonic mean of the mean parts
    assert (parts["ADCC NaN"] == 0).all()
    hm = 3 / (100 / parts["coherency↑"] + 100 / (100 - parts["complexity↓"]) + 100 / (100 - parts["AD↓"]))
    assert (parts["ADCC↑"] <= 100 * hm + 1e-3).all() and (parts["ADCC↑"] > 0.5 * 100 * hm).all()
    man = json.loads((d / "manifest.json").read_text())["params"]
    assert man["n_sensitivity"] == 2 and man["aopc_patch"] == 14 and man["aopc_regions"] == 10
    for f in ("table4.md", "table4.tex", "opticam_more_metrics.ipynb", "index.json"):
        assert (d / f).exists(), f
    assert "| 003 Opti-CAM | Table 4 | `nbs/experiments/opticam_more_metrics.ipynb` |" in (out / "INDEX.md").read_text()
    # the shared cache: the maps were written under the cache_dir given (not the default of the other notebook)
    assert any(p.name.startswith("shapes_shapes-vgg_s_opticam") for p in cache.iterdir())
