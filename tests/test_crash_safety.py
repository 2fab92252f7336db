"Crash safety: `saliency-lab reproduce` killed with SIGKILL mid-run and restarted gives the tables of an uninterrupted run."
import json, os, signal, subprocess, sys, time
import pandas as pd
import pytest
from saliency_lab import cli

PARAMS = {"n_images": 12, "models": ["shapes/resnet_s"], "batch_size": 3, "n_figure": 2,
          "methods": ["gradcam", "opticam"], "methods_a14": ["gradcam"], "transformers": [], "methods_t2": []}


def _values(out):
    t = pd.read_csv(out / "opticam_classification" / "table1.csv")
    return t[[c for c in t.columns if not c.endswith("/ T")]]          # timings differ between runs by nature


def test_sigkill_mid_run_then_restart_equals_uninterrupted(tmp_path):
    ref_out, ref_cache = tmp_path / "ref", tmp_path / "ref_cache"
    cli.reproduce("quick", only="opticam_classification", out_root=ref_out, cache_dir=ref_cache, params=PARAMS,
                  progress=False)

    out, cache = tmp_path / "figs", tmp_path / "cache"
    cmd = [sys.executable, "-m", "saliency_lab.cli", "reproduce", "--only", "opticam_classification",
           "--out", str(out), "--cache-dir", str(cache)] + [f"--param={k}={json.dumps(v)}" for k, v in PARAMS.items()]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(cache.rglob("done.npy")) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    if p.poll() is not None: pytest.fail("the run ended before it could be killed; raise n_images")
    os.killpg(p.pid, signal.SIGKILL)                                      # the CLI and its notebook kernel
    p.wait()
    assert not (out / "opticam_classification" / "table1.csv").exists()  # it really was interrupted
    cli.reproduce("quick", only="opticam_classification", out_root=out, cache_dir=cache, params=PARAMS, progress=False)
    pd.testing.assert_frame_equal(_values(out), _values(ref_out))
