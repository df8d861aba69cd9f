"""bench/edit_latency.py runs end to end and counts one MLLM forward per edit (its timings are measurements, not
asserted: see bench/RESULTS.md)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_edit_latency_prints_its_table(tmp_path, dtype):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "bench/edit_latency.py", "--sizes", "toy", "--steps", "2", "--repeats", "1",
                        "--dtype", dtype], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    row = re.search(r"^\| toy \| 32 \| 2 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)× \| ([\d.]+)× \| (\S+) \|$", p.stdout,
                    re.M)
    assert row, p.stdout
    ours, anchor, ratio, cpu_ratio = map(float, row.groups()[:4])
    assert ours > 0 and anchor > 0 and cpu_ratio > 0 and abs(ratio - ours / anchor) < 0.01 * ratio
    assert row.group(5) == "1"  # exactly one MLLM forward per edit
    for editor in ("ours", "ip2p pipeline"):
        assert re.search(rf"^\| toy \| {editor} \|( [\d.–]+ \|){{5}}$", p.stdout, re.M), p.stdout
