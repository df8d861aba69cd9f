"""First contact (issue 18 §4): `python3 infer.py` on a machine with only requirements.txt installed prints no
accelerate warning, and `evaluate.py` without --ckpt scores the shipped toy checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minedit.toy import world as toyworld

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_fresh(script: str, *args, cwd):
    """Run a script with accelerate and peft (which needs accelerate) hidden, as on a fresh machine."""
    code = ("import runpy, sys; sys.modules['accelerate'] = sys.modules['peft'] = None; "
            f"sys.path.insert(0, {str(ROOT)!r}); sys.argv = {[script, *map(str, args)]!r}; "
            f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_infer_prints_no_accelerate_warning(tmp_path):
    """Before minedit.loading this printed diffusers' "Cannot initialize model with low cpu memory usage because
    `accelerate` was not found" twice (VAE and UNet)."""
    r = run_fresh("infer.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "accelerate" not in r.stderr + r.stdout
    assert "does not know" not in r.stderr  # the shipped example's words are all the toy world's
    assert (tmp_path / "example-edited.png").is_file()


@pytest.mark.slow
def test_infer_names_the_words_the_toy_model_does_not_know(tmp_path):
    """A reader's own toy instruction: words outside the toy vocabulary are named in one warning (they are read as
    <unk>), and the edit still runs."""
    r = run_fresh("infer.py", "--image", ROOT / "assets/toy/example.png", "--instruction",
                  "please vaporise the red blob", "--steps", 2, "--out", tmp_path / "e.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: the model does not know the words 'vaporise', 'blob' (read as <unk>) — the toy "
                        "world's vocabulary is minedit/toy/phrases.py's VOCAB"], r.stderr
    assert (tmp_path / "e.png").is_file()


@pytest.mark.slow
def test_evaluate_defaults_to_the_shipped_checkpoint(tmp_path):
    toyworld.generate(str(tmp_path / "world"), n=20, seed=3, size=32)
    data = tmp_path / "world" / "eval.jsonl"
    common = ["--data", data, "--steps", 2, "--limit", 2]
    r = run_fresh("evaluate.py", *common, "--out", tmp_path / "default.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "accelerate" not in r.stderr
    r2 = run_fresh("evaluate.py", *common, "--out", tmp_path / "named.json", "--ckpt", "assets/toy/insightedit",
                   cwd=ROOT)
    assert r2.returncode == 0, r2.stderr
    default, named = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("default", "named"))
    assert Path(default["ckpt"]).resolve() == (ROOT / "assets" / "toy" / "insightedit").resolve()
    assert default["count"] == 2 and default["summary"] == named["summary"]
