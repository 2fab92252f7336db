"Papermill smoke test of the false-sense fidelity notebook (000 Tables 1, 2, Figures 1, 2) with tiny parameters."
import json
import pandas as pd
from saliency_lab import cli

COLS = ["AI", "AD̄", "AG", "I", "D̄"]


def test_papermill_smoke_falsesense_fidelity(tmp_path):
    "Tables 1, 2, the completeness table, both figures and the correlation table are written and registered; a rerun reuses the cache."
    params = {"n_images": 6, "batch_size": 4, "methods": ["fakecam", "gradient", "gradcam"], "steps": 8,
              "mono_groups": 8, "mono_samples": 2, "n_points": 4}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="falsesense_fidelity", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "falsesense_fidelity"
    t1 = pd.read_csv(d / "table1.csv")
    assert list(t1.columns) == ["Family", "Method", *COLS, "Monotonicity"]
    assert t1["Method"].tolist() == ["Fake-CAM", "Gradient", "Grad-CAM"]
    assert t1["Family"].tolist() == ["Uninformed", "Gradient", "CAM"]
    assert t1[COLS].notna().all().all() and ((t1[COLS] >= 0) & (t1[COLS] <= 100)).all().all()
    assert t1["Monotonicity"].between(-1, 1).all()
    # Fake-CAM keeps every pixel but one: masking with it barely changes the probability
    assert t1.loc[0, "AD̄"] > 99
    t2 = pd.read_csv(d / "table2.csv")
    groups = ["Ground Truth", "Pred", "Least Probable"]
    assert list(t2.columns) == ["Family", "Method"] + [f"{g} / {c}" for g in groups for c in COLS]
    # the ground-truth group of Table 2 is Table 1 without Monotonicity
    pd.testing.assert_frame_equal(t2[[f"Ground Truth / {c}" for c in COLS]].set_axis(COLS, axis=1), t1[COLS])
    # the least probable class has almost no probability to insert
    assert (t2["Least Probable / I"] < 20).all()
    comp = pd.read_csv(d / "table1_completeness.csv")
    assert comp["complete (%)"].between(0, 100).all() and (comp.iloc[:, 3] >= 0).all()
    corr = pd.read_csv(d / "figure2_correlations.csv")
    assert list(corr.columns) == ["Family", "Method", "AG", "AD̄", "I", "D̄"]
    for f in ("table1.md", "table1.tex", "table2.tex", "figure1.png", "figure1.pdf", "figure2.png", "figure2.pdf",
              "falsesense_fidelity.ipynb", "index.json", "manifest.json"):
        assert (d / f).exists(), f
    assert (d / "figure1.png").read_bytes()[:4] == b"\x89PNG"
    index = (out / "INDEX.md").read_text()
    for item in ("Table 1", "Table 2", "Figure 1", "Figure 2"):
        assert f"| 000 False sense | {item} | `nbs/experiments/falsesense_fidelity.ipynb` |" in index
    nb = json.loads((d / "falsesense_fidelity.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Table 1: the paper's claims on our numbers" in text and "Figure 2: the paper's claims" in text
    # a rerun finds every map and score in the cache and writes the same tables
    scores = sorted((cache / "scores").glob("*.pt"))
    assert len(scores) == 9
    mtimes = [p.stat().st_mtime_ns for p in scores]
    cli.reproduce("quick", only="falsesense_fidelity", out_root=out, cache_dir=cache, params=params, progress=False)
    assert [p.stat().st_mtime_ns for p in scores] == mtimes
    pd.testing.assert_frame_equal(pd.read_csv(d / "table1.csv"), t1)
