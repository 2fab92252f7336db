"Papermill smoke tests of the Opti-CAM sanity-check, selectivity and medical-data experiment notebooks (tiny parameters)."
import json
import numpy as np
import pandas as pd
from saliency_lab import cli


def _markdown_outputs(path):
    nb = json.loads(path.read_text())
    return "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))


def test_papermill_smoke_opticam_sanity(tmp_path):
    "Figures A6/A7 are written; one row per (method, similarity, step); similarities in [-1, 1]; the cascade changes the maps."
    params = {"n_images": 3, "batch_size": 3, "methods": ["opticam", "gradcam"], "layers": [["fc"], ["layer3"]],
              "n_show": 2}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_sanity", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "opticam_sanity"
    a6 = pd.read_csv(d / "figure_a6.csv")
    assert list(a6.columns) == ["method", "similarity", "step", "randomised up to", "mean", "std", "n_valid"]
    assert len(a6) == 2 * 4 * 2
    assert set(a6.method) == {"Opti-CAM", "Grad-CAM"}
    assert set(a6.similarity) == {"spearman", "spearman_abs", "ssim", "hog"}
    assert a6[a6.method == "Opti-CAM"]["randomised up to"].tolist()[:2] == ["fc", "layer3"]
    o = a6[a6.method == "Opti-CAM"]
    assert o["mean"].between(-1, 1).all() and (o["n_valid"] == 3).all()
    # randomising the network changes Opti-CAM's maps: no similarity stays at 1
    assert (o["mean"] < 0.99).all()
    for f in ("figure_a6.png", "figure_a6.pdf", "figure_a7.png", "figure_a7.pdf", "opticam_sanity.ipynb",
              "index.json", "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "figure_a7.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(cache.glob("randomization_*.pt"))) == 2
    index = (out / "INDEX.md").read_text()
    for item in ("Figure A6", "Figure A7"):
        assert f"| 003 Opti-CAM | {item} | `nbs/experiments/opticam_sanity.ipynb` |" in index
    assert "Figure A6: the paper's statement on our numbers" in _markdown_outputs(d / "opticam_sanity.ipynb")


def test_papermill_smoke_opticam_selectivity(tmp_path):
    "Figure A4's table has one row per (method, alpha); at a tiny alpha the masked image is almost the original."
    params = {"n_images": 4, "batch_size": 4, "methods": ["gradcam", "opticam"], "alphas": [0.01, 1, 10]}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_selectivity", out_root=out, cache_dir=cache,
                  params={**params, "models": ["shapes/vgg_s"]}, progress=False)
    d = out / "opticam_selectivity"
    a4 = pd.read_csv(d / "figure_a4.csv")
    assert list(a4.columns) == ["model", "method", "alpha", "AD↓", "AG↑", "AI↑"]
    assert sorted(zip(a4.method, a4.alpha)) == [(m, a) for m in ("gradcam", "opticam") for a in (0.01, 1.0, 10.0)]
    assert a4[["AD↓", "AG↑", "AI↑"]].notna().all().all() and a4["AD↓"].between(0, 100).all()
    g = a4[a4.method == "gradcam"].set_index("alpha")
    # s**0.01 is close to 1 except where s is ~0, so little is masked; s**10 masks almost everything but the peak
    assert g.loc[0.01, "AD↓"] < g.loc[10.0, "AD↓"]
    assert not np.allclose(a4[a4.alpha == 1.0]["AD↓"], a4[a4.alpha == 10.0]["AD↓"])
    for f in ("figure_a4.png", "figure_a4.pdf", "opticam_selectivity.ipynb", "index.json", "manifest.json"):
        assert (d / f).exists(), f
    assert "| 003 Opti-CAM | Figure A4 | `nbs/experiments/opticam_selectivity.ipynb` |" in (out / "INDEX.md").read_text()
    assert "Figure A4: the paper's reading on our numbers" in _markdown_outputs(d / "opticam_selectivity.ipynb")


def test_papermill_smoke_opticam_medical(tmp_path):
    "Tables A10/A11 on the quick stand-in (textures): rows and column groups per dataset/model; I, D in [0, 100]."
    params = {"n_images": 4, "batch_size": 4, "methods": ["fakecam", "gradcam", "opticam"],
              "methods_id": ["gradcam", "opticam"], "curve_steps": 16}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_medical", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "opticam_medical"
    a10 = pd.read_csv(d / "table_a10.csv")
    ms = ["textures/resnet_s", "textures/vgg_s"]
    assert list(a10.columns) == ["Method"] + [f"textures / {m} / {c}" for m in ms for c in ("AD↓", "AG↑", "AI↑")]
    assert a10["Method"].tolist() == ["Fake-CAM", "Grad-CAM", "Opti-CAM"]
    assert a10.iloc[:, 1:].notna().all().all()
    a11 = pd.read_csv(d / "table_a11.csv")
    assert list(a11.columns) == ["Method"] + [f"textures / {m} / {c}" for m in ms for c in ("I↑", "D↓")]
    assert a11["Method"].tolist() == ["Grad-CAM", "Opti-CAM"]
    vals = a11.iloc[:, 1:].to_numpy()
    assert np.isfinite(vals).all() and (vals >= 0).all() and (vals <= 100).all()
    # insertion ends on the original image and deletion on black: for these confident networks I > D
    for m in ms:
        assert (a11[f"textures / {m} / I↑"] > a11[f"textures / {m} / D↓"]).all()
    assert "textures" in (d / "table_a10.md").read_text() and "Chest X-ray" in (d / "table_a10.md").read_text()
    man = json.loads((d / "manifest.json").read_text())["params"]
    assert man["curve_steps"] == {"textures": 16} and man["n_images"] == {"textures": 4}
    for f in ("table_a10.md", "table_a10.tex", "table_a11.md", "table_a11.tex", "opticam_medical.ipynb", "index.json"):
        assert (d / f).exists(), f
    index = (out / "INDEX.md").read_text()
    for item in ("Table A10", "Table A11"):
        assert f"| 003 Opti-CAM | {item} | `nbs/experiments/opticam_medical.ipynb` |" in index
    assert "Table A10: the paper's claims on our numbers" in _markdown_outputs(d / "opticam_medical.ipynb")


def test_medical_folder_loader(tmp_path):
    "The full profile's ImageFolder reader: class folders in sorted order, RGB images resized to 224, a missing folder raises."
    import importlib.util, sys, torch
    from PIL import Image
    root = tmp_path / "chest_xray" / "test"
    for cls, colour in (("NORMAL", (255, 0, 0)), ("PNEUMONIA", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L" if cls == "NORMAL" else "RGB", (50, 40), colour[0] if cls == "NORMAL" else colour).save(root / cls / f"{i}.jpeg")
    src = (cli.experiment_notebooks("opticam_medical")[0])
    nb = json.loads(src.read_text())
    code = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and "class MedicalFolder" in "".join(c["source"]))
    ns = {}
    exec("import numpy as np, torch\nimport torch.nn.functional as F\nfrom pathlib import Path\n"
         + code.split("def load_data")[0], ns)
    ds = ns["MedicalFolder"](tmp_path / "chest_xray", "test", None, 224, 0)
    assert ds.classes == ["NORMAL", "PNEUMONIA"] and len(ds) == 4 and ds.kind == "chest_xray"
    x, y, meta = ds[3]
    assert x.shape == (3, 224, 224) and y == 1 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[2].mean(), torch.tensor(1.0), atol=0.02) and x[0].mean() < 0.02   # blue image
    x0, y0, _ = ds[0]
    assert y0 == 0 and torch.allclose(x0[0], x0[1])                                          # grey read as RGB
    assert len(ns["MedicalFolder"](tmp_path / "chest_xray", "test", 3, 224, 0)) == 3
    import pytest
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        ns["MedicalFolder"](tmp_path / "kvasir", "test", None, 224, 0)
