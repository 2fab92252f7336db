"Papermill smoke test of the false-sense robustness/complexity notebook (000 Table 3) with tiny parameters."
import json, math
import numpy as np
import pandas as pd
import torch
from saliency_lab import cli, core, data, experiment, methods as M, models as Z
from saliency_lab.metrics import robustness

NAME = "falsesense_robustness_complexity"
METRICS = ["MS", "AS", "Sparseness", "Complexity", "EC"]


def test_papermill_smoke_falsesense_robustness_complexity(tmp_path):
    "Table 3, the comparison with the paper, the spread table and the figure are written and registered; a rerun reuses the cache."
    params = {"n_images": 4, "n_sens": 2, "n_samples": 3, "sens_chunk": 1, "batch_size": 8,
              "methods": ["fakecam", "gradient"]}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only=NAME, out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / NAME
    t = pd.read_csv(d / "table3.csv")
    assert list(t.columns) == ["Family", "Method", *METRICS]
    assert t["Method"].tolist() == ["Fake-CAM", "Gradient"] and t["Family"].tolist() == ["Uninformed", "Gradient"]
    assert t[METRICS].notna().all().all()
    fake, grad = t.iloc[0], t.iloc[1]
    hw = 64 * 64
    # Fake-CAM's normalised map is all ones but a zero top-left pixel whatever the image: it never changes under
    # noise, its Gini index is 1/HW, its entropy ln(HW-1) and HW-1 pixels exceed 1e-5
    assert fake["MS"] == 0 and fake["AS"] == 0
    assert math.isclose(fake["Sparseness"], 100 / hw, rel_tol=1e-4)
    assert math.isclose(fake["Complexity"], math.log(hw - 1), rel_tol=1e-5)
    assert fake["EC"] == hw - 1
    # MS and AS come from the same sampled ratios: the maximum is at least the mean
    assert grad["MS"] >= grad["AS"] > 0
    assert 0 <= grad["Sparseness"] <= 100 and 0 < grad["Complexity"] <= math.log(hw) + 1e-6 and 0 < grad["EC"] <= hw
    # the gradient's MS/AS equal a direct call of the library metric on the same images and settings
    ds = data.load_dataset("shapes", split="val", n=4, seed=0)
    x, y, _ = data.load_batch(ds, range(2))
    model = Z.load_model("shapes/resnet_s")
    s = robustness.sensitivities(model, x, y, M.create("gradient", model), n_samples=3, radius=0.2,
                                 postprocess=lambda a: core.to_saliency(a, **experiment.FALSESENSE_SALIENCY), seed=0)
    assert math.isclose(grad["MS"], s.amax(1).double().mean().item(), rel_tol=1e-5)
    assert math.isclose(grad["AS"], s.double().mean().item(), rel_tol=1e-5)
    # the comparison table carries the paper's numbers exactly and the relative complexity columns
    vs = pd.read_csv(d / "table3_vs_paper.csv")
    p = experiment.paper_values("000_table3").set_index("method")
    assert vs["MS / paper"].tolist() == [p.loc["fakecam", "MS"], p.loc["gradient", "MS"]]
    assert np.allclose(vs["EC / HW (%) / paper"], 100 * p.loc[["fakecam", "gradient"], "EC"] / 224 ** 2)
    assert np.allclose(vs["Complexity / ln HW (%) / ours"], 100 * t["Complexity"] / math.log(hw))
    sp = pd.read_csv(d / "table3_spread.csv")
    assert sp["metric"].tolist() == METRICS
    for f in ("table3.md", "table3.tex", "table3_vs_paper.tex", "table3_spread.md", "table3_distributions.png",
              "table3_distributions.pdf", f"{NAME}.ipynb", "index.json", "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "table3_distributions.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    for item in ("Table 3", "Table 3 (per-image spread)"):
        assert f"| 000 False sense | {item} | `nbs/experiments/{NAME}.ipynb` |" in index
    nb = json.loads((d / f"{NAME}.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Table 3: the paper's claims on our numbers" in text and "Fake-CAM has Sparseness 0.0" in text
    # a rerun finds every map and sensitivity in the cache and writes the same table
    pieces = sorted((cache / "sensitivities").glob("*/*.npz"))
    assert len(pieces) == 2 * 2                                 # 2 methods × 2 images in pieces of 1
    mtimes = [q.stat().st_mtime_ns for q in pieces]
    cli.reproduce("quick", only=NAME, out_root=out, cache_dir=cache, params=params, progress=False)
    assert [q.stat().st_mtime_ns for q in pieces] == mtimes
    pd.testing.assert_frame_equal(pd.read_csv(d / "table3.csv"), t)
