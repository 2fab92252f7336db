"Papermill smoke tests of the Opti-CAM ablation and other-class experiment notebooks (tiny parameters)."
import json
import pandas as pd
from saliency_lab import cli

COLS = ["AD↓", "AG↑", "AI↑"]


def test_papermill_smoke_opticam_ablation(tmp_path):
    "Tables 6, A12, A13 and Figure A5 are written with the expected rows and columns, and registered in the index."
    params = {"n_images": 4, "batch_size": 4, "reference_methods": ["fakecam", "gradcam"], "iterations": 3,
              "io_iterations": 2, "layers": ["features.13", "features.2"], "sweep_iterations": [1, 3],
              "sweep_lrs": [0.1, 1.0]}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_ablation", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "opticam_ablation"
    t6 = pd.read_csv(d / "table6.csv")
    assert list(t6.columns) == ["Method", "F", "n", *COLS]
    assert t6["Method"].tolist() == ["Fake-CAM", "Grad-CAM"] + ["Opti-CAM"] * 6
    assert t6["F"].iloc[2:].tolist() == ["Mask (10)", "Diff (19)"] * 3
    assert t6["n"].iloc[2:].tolist() == ["Range (16)"] * 2 + ["Max (17)"] * 2 + ["Sigmoid (18)"] * 2
    assert t6[COLS].notna().all().all() and (t6["AD↓"].between(0, 100)).all()
    # the six settings give different maps: not every Opti-CAM row is the same
    assert t6.iloc[2:][COLS].drop_duplicates().shape[0] > 1
    a12 = pd.read_csv(d / "table_a12.csv")
    assert a12["F"].iloc[2:].tolist() == ["Mask (10)", "Diff (19)", "IOMask (A1)", "IODiff (A2)"]
    a13 = pd.read_csv(d / "table_a13.csv")
    assert list(a13.columns) == ["Layer", *COLS] and a13["Layer"].tolist() == ["features.13 (default)", "features.2"]
    # the default layer at 3 iterations, Mask/Range, is the same setting as Table 6's first Opti-CAM row (shared cache)
    pd.testing.assert_series_equal(a13.loc[0, COLS], t6.loc[2, COLS], check_names=False)
    a5 = pd.read_csv(d / "figure_a5.csv")
    assert sorted(zip(a5.lr, a5.iterations)) == [(0.1, 1), (0.1, 3), (1.0, 1), (1.0, 3)]
    for f in ("table6.md", "table6.tex", "table_a12.tex", "table_a13.md", "figure_a5.png", "figure_a5.pdf",
              "opticam_ablation.ipynb", "index.json", "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "figure_a5.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    for item in ("Table 6", "Table A12", "Table A13", "Figure A5"):
        assert f"| 003 Opti-CAM | {item} | `nbs/experiments/opticam_ablation.ipynb` |" in index
    nb = json.loads((d / "opticam_ablation.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Table 6: the paper's claims on our numbers" in text and "Figure A5: the paper's claims" in text


def test_papermill_smoke_opticam_other_classes(tmp_path):
    "Table A9 has one row per method and five column groups; the misclassified group is filled, or empty with a note."
    params = {"n_images": 4, "batch_size": 4, "methods": ["gradcam", "opticam"], "n_pool": 300}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_other_classes", out_root=out, cache_dir=cache,
                  params={**params, "max_misclassified": 2}, progress=False)
    d = out / "opticam_other_classes"
    t = pd.read_csv(d / "table_a9.csv")
    groups = ["Ground Truth", "Most", "Second", "Least", "Most (Mis.)"]
    assert list(t.columns) == ["Method"] + [f"{g} / {c}" for g in groups for c in COLS]
    assert t["Method"].tolist() == ["Grad-CAM", "Opti-CAM"]
    assert t[[f"{g} / {c}" for g in groups for c in COLS]].notna().all().all()   # shapes/resnet_s errs on the pool
    own = pd.read_csv(d / "table_a9_explained_class.csv")
    assert list(own.columns) == list(t.columns)
    # for the ground-truth target both readings measure the same class: identical numbers
    pd.testing.assert_frame_equal(own.iloc[:, 1:4], t.iloc[:, 1:4])
    man = json.loads((d / "manifest.json").read_text())["params"]
    assert man["n_misclassified"] == 2 and man["n_misclassified_found"] >= 2 and man["n_pool"] == 300
    for f in ("table_a9.md", "table_a9.tex", "opticam_other_classes.ipynb", "index.json"):
        assert (d / f).exists(), f
    assert "| 003 Opti-CAM | Table A9 | `nbs/experiments/opticam_other_classes.ipynb` |" in (out / "INDEX.md").read_text()
    # a pool of 4 images that shapes/resnet_s all classifies right: the group is empty and the caption says so
    cli.reproduce("quick", only="opticam_other_classes", out_root=out, cache_dir=cache,
                  params={**params, "n_pool": 4}, progress=False)
    assert json.loads((d / "manifest.json").read_text())["params"]["n_misclassified"] == 0
    t0 = pd.read_csv(d / "table_a9.csv")
    assert t0[[f"Most (Mis.) / {c}" for c in COLS]].isna().all().all()
    pd.testing.assert_frame_equal(t0.iloc[:, :13], t.iloc[:, :13])                 # other groups read from the cache
    assert "none of 4 validation images is misclassified" in (d / "table_a9.md").read_text()
