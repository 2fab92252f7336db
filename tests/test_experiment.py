import hashlib, json, numpy as np, pandas as pd, pytest, torch
from pathlib import Path
from saliency_lab import data, experiment, methods, models


def test_cache_resumes_and_matches_uncached(tmp_path):
    model = models.load_model("shapes/resnet_s")
    ds = data.load_dataset("shapes", n=20)
    ex = methods.create("gradcam", model)
    key = {"dataset": "shapes", "model": "shapes/resnet_s", "method": "gradcam", "target": "label"}
    c = experiment.MapCache(tmp_path, key, len(ds), (64, 64))
    assert experiment.compute_maps(ex, ds, "label", cache=c, batch_size=6, max_chunks=2) is None
    c2 = experiment.MapCache(tmp_path, key, len(ds), (64, 64))
    assert list(c2.missing()) == list(range(12, 20))
    calls = []
    orig = ex.attribute
    ex.attribute = lambda x, t: (calls.append(len(x)), orig(x, t))[1]
    resumed = experiment.compute_maps(ex, ds, "label", cache=c2, batch_size=6)
    assert sum(calls) == 8                              # only the missing images were explained
    direct = experiment.compute_maps(methods.create("gradcam", model), ds, "label", batch_size=6)
    torch.testing.assert_close(resumed, direct, atol=1e-3, rtol=0)


def test_cache_rejects_other_settings_and_recomputes_damaged_entries(tmp_path):
    key = {"dataset": "d", "model": "m", "method": "x"}
    c = experiment.MapCache(tmp_path, key, 4, (8, 8))
    maps = torch.rand(2, 8, 8)
    c.write([0, 1], maps)
    with pytest.raises(ValueError, match="another setting"):
        experiment.MapCache(tmp_path, key, 5, (8, 8))
    torch.testing.assert_close(experiment.MapCache(tmp_path, key, 4, (8, 8)).read([0, 1]), maps, atol=1e-3, rtol=0)
    damage = {"maps.f16 too long": lambda d: open(d / "maps.f16", "ab").write(b"xx"),
              "maps.f16 truncated": lambda d: (d / "maps.f16").write_bytes((d / "maps.f16").read_bytes()[:100]),
              "done.npy garbage": lambda d: (d / "done.npy").write_bytes(b"not a numpy file"),
              "done.npy of another length": lambda d: np.save(d / "done.npy", np.ones(7, bool)),
              "meta.json garbage": lambda d: (d / "meta.json").write_bytes(b"\xff{"),
              "maps.f16 deleted": lambda d: (d / "maps.f16").unlink()}
    for what, hurt in damage.items():
        c = experiment.MapCache(tmp_path, key, 4, (8, 8)); c.write([0, 1], maps)
        hurt(c.dir)
        with pytest.warns(UserWarning, match="damaged map cache"):
            c2 = experiment.MapCache(tmp_path, key, 4, (8, 8))
        assert list(c2.missing()) == [0, 1, 2, 3], what                    # nothing of the damaged entry is read
        with pytest.raises(ValueError, match="not computed"): c2.read([0])
        c2.write([0], maps[:1])                                              # and it works as a fresh cache
        torch.testing.assert_close(experiment.MapCache(tmp_path, key, 4, (8, 8)).read([0]), maps[:1], atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="not computed"):
        experiment.MapCache(tmp_path, {**key, "method": "y"}, 4, (8, 8)).read()


def test_tables_in_three_formats(tmp_path):
    df = pd.DataFrame({"Method": ["Fake-CAM", "A", "B"], "AD↓": [0.1, 5.25, 7.0], "AG↑": [0.5, 3.0, 1.0]})
    csv, md, tex = experiment.write_table(df, tmp_path, "t", caption="Cap 5%", best={"AD↓": "min", "AG↑": "max"},
                                          exclude_from_best=["Fake-CAM"])
    assert pd.read_csv(csv)["AD↓"].tolist() == [0.1, 5.25, 7.0]
    m = md.read_text()
    assert "| A | **5.2** | **3.0** |" in m and "**0.1**" not in m and "Cap 5%" in m
    t = tex.read_text()
    assert r"\textbf{5.2}" in t and r"AD$\downarrow$" in t and r"Cap 5\%" in t and r"\toprule" in t


def test_figures_are_byte_identical_on_rerun(tmp_path):
    import matplotlib.pyplot as plt
    from saliency_lab import plotting
    digests = []
    for _ in range(2):
        fig = plotting.map_grid(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                                {"m": torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))})
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in experiment.save_figure(fig, tmp_path, "f")])
    assert digests[0] == digests[1]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"


def test_index(tmp_path):
    (tmp_path / "e1").mkdir(); (tmp_path / "e1" / "t.csv").write_text("x")
    experiment.register(tmp_path / "e1", [{"paper": "003 Opti-CAM", "item": "Table 10", "notebook": "n", "files": [tmp_path / "e1" / "t.csv"],
                                           "profile": "quick", "runtime": "< 1 min"},
                                          {"paper": "003 Opti-CAM", "item": "Table 2", "notebook": "n", "files": [tmp_path / "e1" / "t.csv"],
                                           "profile": "quick", "runtime": "< 1 min"}])
    txt = experiment.write_index(tmp_path).read_text()
    assert txt.index("Table 2") < txt.index("Table 10") and "[e1/t.csv](e1/t.csv)" in txt
    with pytest.raises(ValueError, match="lacks"):
        experiment.register(tmp_path / "e1", [{"paper": "x"}])
    assert experiment.runtime_bucket(30) == "< 1 min" and experiment.runtime_bucket(200) == "≤ 5 min"


def test_index_keeps_the_longer_runtime(tmp_path):
    "A rerun served from the map cache does not shrink the recorded run time; a longer new run replaces it."
    row = {"paper": "003 Opti-CAM", "item": "Table 1", "notebook": "n", "files": [], "profile": "quick"}
    f = experiment.register(tmp_path / "e", [{**row, "runtime": "≤ 10 min"}])
    experiment.register(tmp_path / "e", [{**row, "runtime": "< 1 min"}])
    assert json.loads(f.read_text())[0]["runtime"] == "≤ 10 min"
    experiment.register(tmp_path / "e", [{**row, "runtime": "≤ 20 min"}])
    assert json.loads(f.read_text())[0]["runtime"] == "≤ 20 min"
    experiment.register(tmp_path / "e", [{**row, "profile": "full", "runtime": "< 1 min"}])
    assert json.loads(f.read_text())[0]["runtime"] == "< 1 min"          # another profile is another row
