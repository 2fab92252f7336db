"Papermill smoke test of the audio plausibility notebook (004 §5) with tiny parameters."
import json
import pandas as pd
import torch
from saliency_lab import audio, cli, experiment, segments as seg
from saliency_lab.metrics import meta

PARAMS = {"n_songs": 2, "n_excerpts": 6, "n_samples": 32, "steps": 60, "ks": [1, 3, 20], "recovery_ks": [1, 3],
          "batch_size": 8, "lime_batch": 64}


def test_papermill_smoke_audio(tmp_path):
    "Every table and figure is written and registered; the rates equal a direct computation on the cached adversaries; a rerun recomputes nothing."
    out, cache = tmp_path / "figs", tmp_path / "cache"
    run = lambda: cli.reproduce("quick", only="plausibility_audio", out_root=out, cache_dir=cache, params=PARAMS,
                                progress=False)
    run()
    d = out / "plausibility_audio"
    for f in ("detector.csv", "detector.md", "detector.tex", "detector_seeds.csv", "attack.csv", "figure2.csv",
              "figure2.png", "figure2.pdf", "label_flip_k3.csv", "figure3.csv", "figure3.png", "example.png",
              "claims.csv", "manifest.json", "plausibility_audio.ipynb"):
        assert (d / f).exists(), f
    det = pd.read_csv(d / "detector_seeds.csv")
    assert det.shape[0] == 1 and 0 <= det.loc[0, "error"] <= 100
    att = pd.read_csv(d / "attack.csv").set_index("direction")
    assert att["excerpts"].sum() == 6 and (att["median L∞ (dB)"].dropna() <= 0.1 * audio.DB_RANGE + 1e-3).all()

    # the label-flip rates of the table equal a direct computation on the cached adversaries
    (fx,) = list((cache / "excerpts").glob("*.pt")); (fa,) = list((cache / "attacks").glob("*.pt"))
    ex, adv = torch.load(fx, weights_only=False), torch.load(fa, weights_only=False)
    model = audio.load_detector()
    ok = adv["success"].bool()
    x, xa = ex["x"][ok], adv["x_adv"][ok]
    assert (adv["x_adv"] - ex["x"]).abs().max() <= 0.1 + 1e-6
    norm = meta.label_flip_rate(model, x, xa, audio.tf_segments(x), [1, 3, 20], explainer="norm", batch_size=5)
    y0 = model(x).argmax(1)
    f2 = pd.read_csv(d / "figure2.csv").set_index(["direction", "k"])
    for c, name in ((0, "no sing → sing"), (1, "sing → no sing")):
        m = y0 == c
        if m.any():
            for j, k in enumerate([1, 3, 20]):
                assert abs(f2.loc[(name, k), "norm baseline (%)"] - 100 * norm[m, j].double().mean().item()) < 1e-3
            assert f2.loc[(name, 20), "LIME (%)"] == 100.0      # all 20 segments = the whole perturbation
    f3 = pd.read_csv(d / "figure3.csv").set_index("k")
    for k in (1, 3):
        cols = [f"{j}/{k}" for j in range(k + 1)]
        if f3.loc[k, "n"] > 0: assert abs(f3.loc[k, cols].sum() - 100) < 1e-3
        assert abs(f3.loc[k, [c + " chance" for c in cols]].sum() - 100) < 1e-3
        flips = (model(seg.localize(x, xa, audio.tf_segments(x), k)).argmax(1) != y0).sum().item()
        assert f3.loc[k, "n"] == flips
    index = (out / "INDEX.md").read_text()
    for item in ("§4.2 detector", "Figure 2", "Figure 3"):
        assert f"| 004 Plausibility | {item} |" in index, item
    assert pd.read_csv(d / "claims.csv")["holds"].isin([True, False]).all()

    n_cached = len(list(cache.rglob("*.pt")))
    run()                                                           # a rerun reads every result from the cache
    assert len(list(cache.rglob("*.pt"))) == n_cached


def _fake_jamendo(root, n=(2, 1, 1), duration=5.0):
    "A Jamendo-style folder (audio/, labels/, filelists/) of synthetic 44.1 kHz songs."
    import numpy as np, soundfile as sf
    for sub in ("audio", "labels", "filelists"): (root / sub).mkdir(parents=True)
    i = 0
    for split, k in zip(audio.SPLITS, n):
        names = []
        for _ in range(k):
            w, s = audio.synth_song(100 + i, duration=duration, sr=44100)
            sf.write(root / "audio" / f"{i:02d} - song.wav", np.stack([w, w], 1), 44100, subtype="FLOAT")
            audio.write_lab(root / "labels" / f"{i:02d} - song.lab", s, duration)
            names.append(f"{i:02d} - song.wav"); i += 1
        (root / "filelists" / split).write_text("\n".join(names) + "\n")


def test_papermill_full_profile_on_fake_jamendo(tmp_path):
    "The full profile reads a Jamendo folder, trains one paper-sized detector per seed (cached) and reports mean ± std."
    root, out, cache = tmp_path / "jamendo", tmp_path / "figs", tmp_path / "cache"
    _fake_jamendo(root)
    params = {"data_root": str(root), "seeds": [0, 1], "n_excerpts": 4, "n_samples": 16, "steps": 30, "step": 0.05, "eps": 0.5, "alpha": 1e4, "detector_epochs": 1, "ks": [1, 3, 20],
              "recovery_ks": [1], "batch_size": 8, "lime_batch": 32}
    cli.reproduce("full", only="plausibility_audio", out_root=out, cache_dir=cache, params=params, progress=False)
    d = out / "plausibility_audio"
    seeds = pd.read_csv(d / "detector_seeds.csv")
    assert seeds["seed"].tolist() == [0, 1]
    summary = pd.read_csv(d / "detector.csv").set_index("metric")
    assert summary.loc["error (%)", "ours"] == f"{seeds['error'].mean():.2f} ± {seeds['error'].std():.2f}"
    dets = sorted((cache / "detectors").rglob("*.pt"))
    assert [p.relative_to(cache / "detectors").as_posix() for p in dets] == \
        ["jamendo_paper_seed0/allsongs_1epochs.pt", "jamendo_paper_seed1/allsongs_1epochs.pt"]
    m = audio.load_detector(dets[0])
    assert sum(p.numel() for p in m.parameters()) > 1_000_000             # the paper's network, not the embedded one
    assert json.loads((d / "manifest.json").read_text())["params"]["profile"] == "full"
