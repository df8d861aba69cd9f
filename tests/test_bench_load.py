"""bench/load_time.py: each road loads the whole UNet + VAE (the weights' bytes are the models'), and only
diffusers' own road without accelerate prints the accelerate warning — the one build.py no longer triggers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minedit import build
from minedit.presets import preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "load_time.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_load_time_roads(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--size", "toy", "--repeats", "1", "--folder", tmp_path / "sd",
                        "--keep"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| road")}
    assert rows["diffusers"][-1] == "2" and rows["minedit"][-1] == "0"  # VAE + UNet warned once each
    assert set(rows) <= {"diffusers", "diffusers+accelerate", "minedit"}
    # one child, read directly: it loaded every tensor of the saved models
    c = subprocess.run([sys.executable, SCRIPT, "--child", "minedit", "--folder", tmp_path / "sd", "--size", "toy"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    got = json.loads(c.stdout.strip().splitlines()[-1])
    cfg = preset("insightedit", "toy")
    want = sum(t.numel() * t.element_size() for m in (build.build_unet(cfg), build.build_vae(cfg))
               for t in m.state_dict().values())
    assert got["weights"] == want and got["seconds"] > 0 and got["peak"] >= got["added"] > 0
