"""Every bench script turns a bad flag into a UserError (run_cli prints it as one `error: ...` line)."""
import importlib
import re
from pathlib import Path

import pytest

from minedit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, argv, message", [
    ("edit_latency", ["--sizes", "huge"], "--sizes huge"),
    ("edit_latency", ["--repeats", "0"], "--repeats 0"),
    ("edit_latency", ["--mid-steps", "0"], "--mid-steps 0"),
    ("edit_latency", ["--scheduler", "NoSuchScheduler"], "--scheduler"),
    ("edit_latency", ["--device", "gpu"], "--device gpu"),
    ("edit_latency", ["--sizes", "full"], "--sizes full needs --device cuda"),
    ("train_overhead", ["--sizes", "huge"], "--sizes huge"),
    ("train_overhead", ["--steps", "0"], "--steps 0"),
    ("train_overhead", ["--batch-size", "0"], "--batch-size 0"),
    ("train_overhead", ["--workers", "-1"], "--workers -1"),
    ("train_overhead", ["--sizes", "full"], "--sizes full needs --device cuda"),
    ("memory", ["--recipes", "nosuch"], "--recipes nosuch"),
    ("memory", ["--recipes", "ip2p:1"], "ip2p has stages 2"),
    ("memory", ["--sizes", "huge"], "--sizes huge"),
    ("memory", ["--threads", "0"], "--threads 0"),
])
def test_bad_flags_are_user_errors(script, argv, message, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    with pytest.raises(UserError, match=re.escape(message)):
        importlib.import_module(script).main(argv)
