import json, subprocess, sys, numpy as np, pandas as pd, pytest
from pathlib import Path
from PIL import Image
from saliency_lab import cli, core, data


def run(*args):
    return subprocess.run([sys.executable, "-m", "saliency_lab.cli", *args], capture_output=True, text=True)


def test_list():
    out = cli.main(["list"])
    assert out == 0


def test_list_prints_registries(capsys):
    cli.main(["list", "methods"])
    assert "gradcam" in capsys.readouterr().out


def test_explain_writes_overlay(tmp_path):
    x, _, _ = data.load_dataset("shapes", n=1)[0]
    img = tmp_path / "in.png"
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(img)
    r = cli.explain_file(img, "shapes/resnet_s", "gradcam", tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG" and 0 <= r["probability"] <= 1
    with pytest.raises(FileNotFoundError):
        cli.explain_file(tmp_path / "missing.png", "shapes/resnet_s", "gradcam", tmp_path / "o.png")


def test_unknown_experiment():
    with pytest.raises(ValueError, match="no experiment matches"):
        cli.experiment_notebooks("nothing-like-this")


def _tables(d):
    return pd.read_csv(d / "opticam_classification" / "table1.csv")


def test_papermill_smoke_opticam_classification_and_resume(tmp_path):
    "Run the experiment notebook through papermill with tiny parameters, twice: the cache is reused, tables identical."
    params = {"n_images": 6, "models": ["shapes/resnet_s"], "batch_size": 3, "n_figure": 2,
              "methods": ["fakecam", "gradcam", "opticam"], "methods_a14": ["gradcam"],
              "transformers": ["shapes/vit_s"], "methods_t2": ["gradcam", "rollout"]}
    out, cache = tmp_path / "figs", tmp_path / "cache"
    cli.reproduce("quick", only="opticam_classification", out_root=out, cache_dir=cache, params=params, progress=False)
    t1 = _tables(out)
    assert list(t1.columns) == ["Method"] + [f"shapes/resnet_s / {c}" for c in ("AD↓", "AG↑", "AI↑", "T")]
    assert t1["Method"].tolist() == ["Fake-CAM", "Grad-CAM", "Opti-CAM"]
    assert (t1["shapes/resnet_s / T"] > 0).all()
    a14 = pd.read_csv(out / "opticam_classification" / "table_a14.csv")
    assert a14["Method"].tolist() == ["Grad-CAM"]
    t2 = pd.read_csv(out / "opticam_classification" / "table2.csv")
    assert t2["Method"].tolist() == ["Grad-CAM", "Rollout"] and "shapes/vit_s / AG↑" in t2.columns
    for f in ("table1.md", "table1.tex", "table_a14.tex", "figure2_shapes_resnet_s.png", "figure2_shapes_resnet_s.pdf",
              "opticam_classification.ipynb", "index.json"):
        assert (out / "opticam_classification" / f).exists(), f
    index = (out / "INDEX.md").read_text()
    for item in ("Table 1", "Table 2", "Table A14", "Figure 2"):
        assert f"| 003 Opti-CAM | {item} |" in index
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("maps.f16")}
    assert len(stamps) == 6
    cli.reproduce("quick", only="opticam_classification", out_root=out, cache_dir=cache, params=params, progress=False)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("maps.f16")} == stamps     # maps read, not recomputed
    pd.testing.assert_frame_equal(_tables(out), t1)                              # timings reused with the maps
    nb = json.loads((out / "opticam_classification" / "opticam_classification.ipynb").read_text())
    assert "papermill" not in nb["metadata"]


def test_console_script_help():
    r = run("--help")
    assert r.returncode == 0 and "reproduce" in r.stdout

def test_papermill_smoke_benchmark_gradient(tmp_path):
    "The benchmark notebook runs end to end with two images and writes one timing row per model and method."
    out = tmp_path / "figs"
    cli.reproduce("quick", only="benchmark_gradient", out_root=out, params={"n_images": 2, "batch_size": 16, "repeats": 1},
                  progress=False)
    t = pd.read_csv(out / "benchmark_gradient" / "timing.csv")
    assert len(t) == 10 and t["model"].nunique() == 2
    assert (t["ours (ms/image)"] > 0).all() and (t["Captum (ms/image)"] > 0).all()
    assert np.allclose(t["Captum / ours"], t["Captum (ms/image)"] / t["ours (ms/image)"], rtol=1e-2)
    assert "Benchmark: gradient methods vs Captum" in (out / "INDEX.md").read_text()

def test_papermill_smoke_gallery(tmp_path):
    "The gallery runs every registered method on one image and writes a figure per family plus a timing row per method."
    from saliency_lab import methods
    out = tmp_path / "figs"
    cli.reproduce("quick", only="gallery", out_root=out, params={"n_images": 1}, progress=False)
    t = pd.read_csv(out / "gallery" / "seconds.csv")
    transformer = {"raw_attention", "rollout", "transformer_attribution"}
    assert set(t["method"]) == set(methods.available()) - transformer
    assert (t["seconds / image"] >= 0).all()
    for f in ("gallery", "gallery_gradient", "gallery_cam", "gallery_perturbation", "gallery_transformer"):
        assert (out / "gallery" / f"{f}.png").stat().st_size > 10_000
    assert "Gallery of all methods" in (out / "INDEX.md").read_text()
