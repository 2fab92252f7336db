"Papermill smoke test of the false-sense transformation experiment notebook (000 Table 4; tiny parameters)."
import json
import pandas as pd
from saliency_lab import cli, data

METRICS = ["AI", "AD̄", "AG", "I", "D̄"]
GROUPS = ["MixUp", "Resize", "Rotation", "Crop"]


def test_papermill_smoke_falsesense_transformations(tmp_path):
    "Table 4, all-strength table, y_c table, Kendall τ and figures are written with the expected layout and indexed."
    params = {"n_images": 4, "batch_size": 4, "steps": 4, "methods": ["fakecam", "gradcam"],
              "table_levels": {"rotation": 3}, "figure_methods": ["gradcam"]}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="falsesense_transformations", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "falsesense_transformations"
    t4 = pd.read_csv(d / "table4.csv")
    assert list(t4.columns) == ["Family", "Method"] + [f"{g} / {m}" for g in GROUPS for m in METRICS]
    assert t4["Method"].tolist() == ["Fake-CAM", "Grad-CAM"] and t4["Family"].tolist() == ["Uninformed", "CAM"]
    vals = t4.iloc[:, 2:]
    assert vals.notna().all().all() and ((vals >= 0) & (vals <= 100)).all().all()
    al = pd.read_csv(d / "table4_all_levels.csv")
    assert list(al.columns) == ["Transformation", "Strength", "Family", "Method", *METRICS]
    assert len(al) == 2 * 17 and al["Transformation"].iloc[:2].tolist() == ["Untransformed", "Untransformed"]
    # each table4 column group is the all-levels row of its level: level 1 (default) or 3 (rotation, set above)
    for g, kind, lvl in (("MixUp", "mixup", 1), ("Rotation", "rotation", 3), ("Crop", "crop", 1)):
        s = f"{data.TRANSFORM_LEVELS[kind][lvl]:g}"
        row = al[(al.Transformation == g) & (al.Strength.astype(str) == s)].set_index("Method")[METRICS]
        pd.testing.assert_frame_equal(row.reset_index(drop=True),
                                      t4[[f"{g} / {m}" for m in METRICS]].set_axis(METRICS, axis=1), check_names=False)
    # the transformations change something: not every setting gives the untransformed scores
    assert al.groupby(["Transformation", "Strength"])[METRICS].mean().drop_duplicates().shape[0] > 1
    p = pd.read_csv(d / "table4_probability.csv")
    assert list(p.columns) == ["Transformation", "Strength", "y_c (%)", "Accuracy (%)", "in Table 4"]
    assert len(p) == 17 and p["y_c (%)"].between(0, 100).all() and (p["in Table 4"] == "✓").sum() == 4
    tau = pd.read_csv(d / "table4_kendall.csv")
    assert tau["Metric"].tolist() == METRICS + ["mean"] and len(tau.columns) == 1 + 2 * 4
    man = json.loads((d / "manifest.json").read_text())["params"]
    parts = man["mixup_partners"]
    ys = [int(data.load_dataset("shapes", n=4, split="val")[i][1]) for i in range(4)]
    assert len(parts) == 4 and all(ys[j] != ys[i] for i, j in enumerate(parts))      # partners of another class
    for f in ("table4.md", "table4.tex", "table4_vs_paper.csv", "figure4_strength.png", "figure4_strength.pdf",
              "figure4_examples.png", "falsesense_transformations.ipynb", "index.json"):
        assert (d / f).exists(), f
    assert (d / "figure4_strength.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    for item in ("Table 4", "Table 4 (all strengths, y_c, accuracy)", "Table 4 (figure: metrics against strength)"):
        assert f"| 000 False sense | {item} | `nbs/experiments/falsesense_transformations.ipynb` |" in index
    nb = json.loads((d / "falsesense_transformations.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Table 4 levels" in text and "on our numbers: the paper's claims" in text and "All 17 settings" in text
