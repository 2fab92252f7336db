"Papermill smoke tests of the Opti-CAM bounding-box study (Table 5) and localisation (Tables A7, A8) notebooks (tiny parameters)."
import json
import numpy as np
import pandas as pd
from saliency_lab import cli

INDEX = "| 003 Opti-CAM | {} | `nbs/experiments/{}.ipynb` |"


def _markdown_outputs(path):
    nb = json.loads(path.read_text())
    return "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))


def test_papermill_smoke_opticam_bbox(tmp_path):
    "Table 5 has the box rows and one row per method, nine columns; the study's maps obey their definitions."
    params = {"n_images": 4, "batch_size": 4, "methods": ["fakecam", "gradcam"], "n_figure": 2}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_bbox", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "opticam_bbox"
    t = pd.read_csv(d / "table5.csv")
    cols = [f"{m} / {v}" for m in ("AD↓", "AG↑", "AI↑") for v in ("S", "B ∩ S", "S ∖ B")]
    assert list(t.columns) == ["Method", *cols]
    assert t["Method"].tolist() == ["S := B", "S := I ∖ B", "Fake-CAM", "Grad-CAM"]
    # the box rows have only the S columns; the method rows have all nine
    assert t.loc[:1, [c for c in cols if not c.endswith("/ S")]].isna().all().all()
    assert t.loc[:1, [c for c in cols if c.endswith("/ S")]].notna().all().all()
    assert t.loc[2:, cols].notna().all().all()
    assert t[[c for c in cols if c.startswith("AD")]].stack().dropna().between(0, 100).all()
    # Fake-CAM is ones but one pixel: inside the box it is (nearly) the box, outside (nearly) the complement
    np.testing.assert_allclose(t.loc[2, "AD↓ / B ∩ S"], t.loc[0, "AD↓ / S"], atol=2.0)
    np.testing.assert_allclose(t.loc[2, "AD↓ / S ∖ B"], t.loc[1, "AD↓ / S"], atol=2.0)
    assert t.loc[2, "AD↓ / S"] < 5                      # masking by an all-ones map changes nothing
    for f in ("table5.md", "table5.tex", "table5_maps.png", "table5_maps.pdf", "opticam_bbox.ipynb", "index.json",
              "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "table5_maps.png").read_bytes()[:4] == b"\x89PNG"
    assert INDEX.format("Table 5", "opticam_bbox") in (out / "INDEX.md").read_text()
    assert "Table 5: the paper's claims on our numbers" in _markdown_outputs(d / "opticam_bbox.ipynb")


def test_papermill_smoke_opticam_localization(tmp_path):
    "Tables A7 and A8 have one row per method and seven metric columns per model, in range, and are indexed."
    params = {"n_images": 4, "batch_size": 4, "models": ["shapes/resnet_s"], "methods": ["fakecam", "gradcam"],
              "methods_t": ["fakecam", "rollout"], "n_box_thresholds": 10, "n_figure": 2}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_localization", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "opticam_localization"
    metrics = ["OM↓", "LE↓", "F1↑", "BA↑", "SP↑", "EP↑", "SM↓"]
    for name, model, rows in (("table_a7", "shapes/resnet_s", ["Fake-CAM", "Grad-CAM"]),
                              ("table_a8", "shapes/vit_s", ["Fake-CAM", "Rollout"])):
        t = pd.read_csv(d / f"{name}.csv")
        cols = [f"{model} / {m}" for m in metrics]
        assert list(t.columns) == ["Method", *cols] and t["Method"].tolist() == rows
        assert t[cols].notna().all().all()
        assert t[cols[:-1]].stack().dropna().between(0, 100).all()
        # OM adds the class check to LE: never below it
        assert (t[f"{model} / OM↓"] >= t[f"{model} / LE↓"] - 1e-9).all()
        # Fake-CAM: every pixel but one is a maximum (SP 100 %), and its predicted box is the whole image
        fake = t.set_index("Method").loc["Fake-CAM"]
        assert fake[f"{model} / SP↑"] == 100
        assert fake[f"{model} / LE↓"] > t.set_index("Method").drop(index="Fake-CAM")[f"{model} / LE↓"].min()
    for f in ("table_a7.md", "table_a7.tex", "table_a8.tex", "maps_shapes_resnet_s.png", "maps_shapes_vit_s.pdf",
              "opticam_localization.ipynb", "index.json", "manifest.json"):
        assert (d / f).exists(), f
    index = (out / "INDEX.md").read_text()
    for item in ("Table A7", "Table A8"):
        assert INDEX.format(item, "opticam_localization") in index
    text = _markdown_outputs(d / "opticam_localization.ipynb")
    assert "Table A7: the paper's claims on our numbers" in text and "Table A8: the paper's claims" in text
