"""bench/train_overhead.py runs end to end (its figures are measurements, not asserted: see bench/RESULTS.md)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_overhead_prints_its_table(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "MINEDIT_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "bench/train_overhead.py", "--sizes", "toy", "--steps", "2", "--repeats", "1",
                        "--batch-size", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    row = re.search(r"^\| toy \| 4 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)× \| ([\d.]+) \| – \|$", p.stdout, re.M)
    assert row, p.stdout
    loop, bare, ratio, samples_s = map(float, row.groups())
    assert loop > 0 and bare > 0 and abs(ratio - loop / bare) < 0.05 * ratio + 1e-3
    assert abs(samples_s - 4 / (bare / 1e3)) < 0.01 * samples_s + 0.01
