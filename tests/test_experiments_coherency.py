"Papermill smoke test of the three coherency notebooks (002) with tiny parameters and one shared cache."
import json
import numpy as np
import pandas as pd
import torch
from saliency_lab import cli, data, experiment, models as Z
from saliency_lab.metrics.curves import auc

METHODS = ["gradcam", "integrated_gradients", "lrp", "smoothgrad"]
NAMES = ["Grad-CAM", "Integrated Gradients", "LRP", "SmoothGrad"]
MODELS = ["shapes/resnet_s", "shapes/vgg_s"]
PARAMS = {"n_images": 6, "steps": 4, "uniform_seeds": 2, "batch_size": 4, "methods": METHODS}


def _markdown(nb_path):
    nb = json.loads(nb_path.read_text())
    return "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))


def test_papermill_smoke_coherency(tmp_path):
    "Every table and figure of the three notebooks is written and registered, from one shared cache; a rerun recomputes nothing."
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="coherency_scores", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    d = out / "coherency_scores"
    t1, t2 = pd.read_csv(d / "table1.csv"), pd.read_csv(d / "table2.csv")
    assert list(t1.columns) == ["Method", *MODELS] and t1["Method"].tolist() == NAMES
    assert ((t1[MODELS] >= 0) & (t1[MODELS] <= 100)).all().all()
    k = t2[MODELS].to_numpy() * 6 / 100                  # a hit or a miss on each of the 6 images (all have boxes)
    assert np.allclose(k, k.round()) and ((k >= 0) & (k <= 6)).all()
    aucs = pd.read_csv(d / "insertion_deletion_auc.csv")
    assert len(aucs) == len(MODELS) * len(METHODS)
    assert {f"{k} {c}" for k in ("insertion", "deletion") for c in experiment.COHERENCY_CONFIGS} <= set(aucs.columns)
    for f in ("figure2.png", "figure_a2.png", "figure_a3.pdf", "figure_a4.png", "figure_a5.pdf", "table1.tex", "table2.md"):
        assert (d / f).exists(), f
    assert "Tables 1, 2 and Figure 2: the paper's claims" in _markdown(d / "coherency_scores.ipynb")

    # the table's AD is the mean of the cached per-image scores, which equal a direct computation
    ds = data.load_dataset("shapes", n=6)
    model = Z.load_model("shapes/vgg_s")
    sal, sc = experiment.coherency_run(model, "shapes/vgg_s", "gradcam", ds, cache_dir=cache, steps=4, uniform_seeds=2,
                                       batch_size=4, method_kw=None)
    assert abs(t1.loc[0, "shapes/vgg_s"] - sc["AD"].mean().item()) < 1e-3          # the CSV keeps 3 decimals
    direct = experiment.coherency_scores(model, ds, sal, steps=4, uniform_seeds=2, batch_size=6, configs=("mean+pixel",))
    torch.testing.assert_close(direct["AD"], sc["AD"], atol=1e-5, rtol=0)
    torch.testing.assert_close(auc(direct["deletion mean+pixel"]), auc(sc["deletion mean+pixel"]), atol=1e-5, rtol=0)

    scores = sorted((cache / "scores").glob("*.pt"))
    assert len(scores) == len(MODELS) * len(METHODS)
    cli.reproduce("quick", only="coherency_reliability", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    cli.reproduce("quick", only="coherency_sparsity", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    r, s = out / "coherency_reliability", out / "coherency_sparsity"
    t3 = pd.read_csv(r / "table3.csv")
    assert len(t3) == len(MODELS) * 2 * 6 and set(experiment.COHERENCY_CONFIGS) <= set(t3.columns)
    v = t3[list(experiment.COHERENCY_CONFIGS)].to_numpy()
    assert np.nanmax(np.abs(v)) <= 1 + 1e-9 and np.allclose(np.diagonal(v[:6]), 1)
    t4 = pd.read_csv(r / "table4.csv")
    assert t4["Pair"].tolist()[:6] == ["insertion & deletion", "insertion & AD", "insertion & PG", "deletion & AD",
                                       "deletion & PG", "AD & PG"]
    a2 = pd.read_csv(r / "table_a2.csv")
    assert list(a2.columns) == ["Model", "Method", "real", "50%", "70%", "75%", "80%", "85%", "90%"]
    # the real-valued AD of Table A2 is Table 1's
    assert np.allclose(a2[a2.Model == "shapes/resnet_s"]["real"].to_numpy(), t1["shapes/resnet_s"].to_numpy(), atol=1e-3)
    for f in ("table7.csv", "table_a3.csv", "table_a4.csv", "table_a5.tex", "table3_matrices.png"):
        assert (r / f).exists(), f
    for f in ("figure3.png", "figure3_sparsity.csv", "table5.csv", "table6.csv", "table_a1.csv", "blur_sweep.csv",
              "figure4.png", "figure_a1.png", "figure_a1c.pdf"):
        assert (s / f).exists(), f
    t5 = pd.read_csv(s / "table5.csv")
    assert t5.iloc[:, 0].tolist() == ["Integrated Gradients", "SmoothGrad"]
    # the unblurred column of Table 5 is Table 1's AD of the same methods
    assert np.allclose(t5["no blur"].to_numpy(), t1.set_index("Method").loc[["Integrated Gradients", "SmoothGrad"], "shapes/resnet_s"], atol=1e-3)
    assert "Internal consistency: the paper's claims" in _markdown(r / "coherency_reliability.ipynb")
    assert "Sparsity: the paper's claims" in _markdown(s / "coherency_sparsity.ipynb")
    index = (out / "INDEX.md").read_text()
    for nb, items in (("coherency_scores", ("Table 1", "Table 2", "Figure 2", "Figure A2", "Figure A5")),
                      ("coherency_reliability", ("Table 3", "Table 4", "Table 7", "Table A2", "Table A3", "Table A4", "Table A5")),
                      ("coherency_sparsity", ("Figure 3", "Table 5", "Table 6", "Table A1", "Figure 4", "Figure A1"))):
        for item in items:
            assert f"| 002 Coherency | {item} | `nbs/experiments/{nb}.ipynb` |" in index, (nb, item)
    # the two later notebooks read the maps and scores of the first from the shared cache, and a rerun computes nothing
    every = sorted((cache / "scores").glob("*.pt"))
    assert set(scores) <= set(every)
    mtimes = [p.stat().st_mtime_ns for p in every]
    cli.reproduce("quick", only="coherency", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    assert sorted((cache / "scores").glob("*.pt")) == every and [p.stat().st_mtime_ns for p in every] == mtimes
    pd.testing.assert_frame_equal(pd.read_csv(d / "table1.csv"), t1)
