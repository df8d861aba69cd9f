"""Shared test helpers."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
# The top-level scripts (train.py, infer.py, evaluate.py) are imported by some tests.
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest.ini's two workers: one core each, no oversubscription
    torch.set_num_threads(1)


def import_script(path: Path):
    """A script (scripts/NAME.py) imported as a module named after its file, without running its main."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess from the repository root (or `cwd`), output captured as text. One intra-op
    thread unless the environment or `env` says otherwise: on a small shared CPU, torch's spinning worker threads
    can make a toy run ten times slower. Bytes arguments pass through as they are (non-UTF-8 input tests)."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, capture_output=True, text=True,
                          errors="replace", timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", **os.environ, **(env or {})})


def run_script(script: str, *args, **kw) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` for a script path relative to the repository root, or `python -m minedit.x ARGS`."""
    return run_python(*(["-m", script] if script.startswith("minedit.") else [ROOT / script]), *args, **kw)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run succeeded; otherwise the assertion shows the end of its output."""
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def tiny_unet(seed: int = 0, **kw) -> UNet2DConditionModel:
    """A seeded two-block SD-style UNet (cross-attention width 32), small enough for exact-equality tests."""
    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)
    config.update(kw)
    return UNet2DConditionModel(**config).eval()
