"""Load time and peak RSS of the full preset's UNet + VAE from a saved folder: diffusers' loader against minedit's.

    OMP_NUM_THREADS=1 python3 bench/load_time.py                 # full size, fp32 (3.4 GB written to a temp folder)
    python3 bench/load_time.py --size toy                        # the toy preset's (seconds)
    python3 bench/load_time.py --folder /data/sd-rand --keep     # keep the saved folder for a rerun

The folder is the full preset's UNet (8 input channels, InstructPix2Pix's) and VAE, built on the CPU from
`preset("insightedit", "full")`'s fields with random weights (load cost does not depend on the values) and
written with `save_pretrained` in diffusers' layout, as `sd_path` would name. Each road then loads both models in
a fresh process (so its peak RSS is its own), after the files have been read once (warm page cache for all):
  diffusers             UNet2DConditionModel / AutoencoderKL.from_pretrained on a machine with only
                        requirements.txt: `accelerate` (and peft, which needs it) hidden. What build.py did before.
  diffusers+accelerate  the same with accelerate importable (its low_cpu_mem_usage road), when it is installed.
  minedit               build.build_unet + build.build_vae (diffusers' loader with low_cpu_mem_usage=False said
                        explicitly, so no warning), accelerate hidden. What build.py does now.
Columns (median over --repeats, the roads interleaved): wall seconds of the two loads; what the RSS grew by
during them; the process's peak RSS (ru_maxrss) after every weight has also been touched once (as the first
forward would: weights left memory-mapped to the file count in the RSS only once touched) and what that peak
adds to the RSS after imports; the weights' bytes; how many times diffusers' "`accelerate` was not found"
warning was printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROADS = ("diffusers", "diffusers+accelerate", "minedit")
GIB = 2 ** 30
sys.path.insert(0, os.path.dirname(HERE))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def cfg_for(size: str, folder: str = ""):
    from minedit.presets import preset

    cfg = preset("insightedit", size)
    cfg.sd_path = folder
    return cfg


def child(road: str, folder: str, size: str, load_dtype: str) -> None:
    """One road in this process; prints one JSON line. Imports come first so their memory is not counted."""
    if road != "diffusers+accelerate":
        sys.modules["accelerate"] = sys.modules["peft"] = None  # a fresh machine: requirements.txt only
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = cfg_for(size, folder)
    from minedit import build

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[load_dtype]
    base = rss_bytes()
    t0 = time.perf_counter()
    if road == "minedit":
        unet, vae = build.build_unet(cfg, dtype), build.build_vae(cfg, dtype)
    else:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)
    seconds = time.perf_counter() - t0
    loaded = rss_bytes() - base
    # Weights read from a memory-mapped file count in the RSS only once touched: touch them all, as the first
    # forward would, so every road's peak includes the weights however they were loaded.
    tensors = [t for m in (unet, vae) for t in m.state_dict().values()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    with torch.no_grad():
        for t in tensors:
            t.sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    assert all(not p.is_meta for m in (unet, vae) for p in m.parameters()) and torch.is_tensor(next(unet.parameters()))
    print(json.dumps(dict(road=road, seconds=seconds, loaded=loaded, peak=peak, added=peak - base, weights=weights)))


def save_random(folder: str, size: str, dtype: str) -> None:
    import torch

    from minedit import build

    cfg = cfg_for(size)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet, vae = build.build_unet(cfg), build.build_vae(cfg)
    if dtype == "fp16":
        unet, vae = unet.half(), vae.half()
    unet.save_pretrained(os.path.join(folder, "unet"))
    del unet
    vae.save_pretrained(os.path.join(folder, "vae"))
    print(f"built and saved the {size} UNet + VAE ({dtype}) to {folder} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)


def warm(folder: str) -> None:
    """Read every file once so each road starts from the same (warm) page cache."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def accelerate_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def measure(folder: str, size: str, roads, repeats: int, load_dtype: str) -> list[dict]:
    runs = {road: [] for road in roads}
    for _ in range(repeats):
        for road in roads:
            warm(folder)
            r = subprocess.run([sys.executable, __file__, "--child", road, "--folder", folder, "--size", size,
                                "--load-dtype", load_dtype],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"error: the {road} road failed:\n{r.stderr[-2000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["warnings"] = sum("accelerate` was not found" in line for line in r.stderr.splitlines())
            runs[road].append(row)
    return [{k: (statistics.median(r[k] for r in rs) if k != "road" else road) for k in rs[0]}
            for road, rs in runs.items()]


def table(rows: list[dict]) -> str:
    lines = ["| road | load s | RSS added by the load GiB | peak RSS GiB | peak added GiB | weights GiB | "
             "accelerate warnings |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['road']} | {r['seconds']:.2f} | {r['loaded'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
                     f"{r['added'] / GIB:.2f} | {r['weights'] / GIB:.2f} | {r['warnings']:g} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["full", "toy"], default="full")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--load-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype to load in (bf16: the full preset's frozen parts on a GPU)")
    p.add_argument("--folder", help="where to save (or find) the random-weight folder (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the folder afterwards")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per road (median reported)")
    p.add_argument("--child", choices=ROADS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.folder, a.size, a.load_dtype)
        return 0
    folder = a.folder or tempfile.mkdtemp(prefix="minedit-load-")
    try:
        if not os.path.isfile(os.path.join(folder, "unet", "config.json")):
            save_random(folder, a.size, a.dtype)
        roads = [r for r in ROADS if r != "diffusers+accelerate" or accelerate_installed()]
        rows = measure(folder, a.size, roads, a.repeats, a.load_dtype)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    import platform

    import torch

    print(f"`{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; "
          f"torch {torch.__version__}; load avg {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}`\n")
    print(f"{a.size} preset UNet + VAE, saved {a.dtype}, loaded {a.load_dtype}, warm page cache, "
          f"a fresh process per load, median of {a.repeats}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
