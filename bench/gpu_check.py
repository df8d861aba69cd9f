"""One prepared GPU check (issue 19): versions, toy-size correctness on the device, and the full-size figures.

    bash bench/gpu_check.sh --out OUT            # on a CUDA machine: about 5 minutes, at most --budget (480 s)
    bash bench/gpu_check.sh --fetch-wheels       # here, with PyPI: put diffusers' wheel in .whl/ (git-ignored)
    python3 bench/gpu_check.py --device cpu --out OUT   # the CPU mode: toy sizes only (tests/test_gpu_check.py)

The parts run one after another, each a subprocess under its own time limit (a hang or a crash costs that part
only; what it printed is kept):

  env      python, torch (+ CUDA, cuDNN), transformers, diffusers (and where it came from), the device, SDPA flags
  toy      bench/gpu_toy.py: every recipe × stage at toy size — bf16 and fp16 + GradScaler steps lower the loss on
           a fixed batch, which attention kernels run (and that fused-only SDPA runs), a device edit against the
           CPU fp32 edit of the same checkpoint
  latency  bench/edit_latency.py --sizes full --dtype bf16: the full stage-3 InsightEdit (7B LLaVA, SD1.5 UNet,
           random weights built on the GPU), 256 px, 50 DDIM steps, MLLM included, against diffusers'
           InstructPix2Pix pipeline on the same UNet in the same process (target: ≤ 0.5 s per edit)
  train    bench/train_overhead.py --sizes full: stage-2 bare training step, batch 8, bf16, gradient
           checkpointing -> samples/s (target: ≥ 25) and torch.cuda's peak allocation
  memory   bench/memory.py --device cuda --recipes insightedit:2 --max-batch 8: the allocator's peaks at batches
           1-8 with and without checkpointing, next to memory.py's CPU model of the same steps (the shape-only
           ledger, run at the start in the background on the CPU)

OUT receives log.txt (everything printed), results.json (every part's status and figures) and summary.md (the
tables and the targets), rewritten after each part. The exit status is 0 when every part ran and passed.

On the GPU machine (torch 2.11, transformers, no diffusers, no package registry), from a session with the device
tool, once `bash bench/gpu_check.sh --fetch-wheels` has filled .whl/ here:

    run(command="bash bench/gpu_check.sh --out $OUT", carry=[".whl"], timeout_s=540)

gpu_check.sh installs .whl/*.whl with pip --no-index into /tmp when diffusers is missing. Rerun single parts
with --parts (e.g. --parts latency,train).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = ("env", "toy", "latency", "train", "memory")
# seconds, 470 of the 480-s budget; on an H200 (2026-12-04) the parts took: toy > 110 (7 of 8 rows in 90),
# latency 50, train 66, memory 50
LIMITS = {"toy": 200, "latency": 90, "train": 90, "memory": 90}
GIB = 2 ** 30


def commands(device: str, work: str, recipes: str) -> dict:
    """Each part's command line: full sizes on CUDA, toy sizes (a few steps) on the CPU."""
    py = [sys.executable]
    j = lambda name: ["--json", os.path.join(work, f"{name}.json")]  # noqa: E731
    if device.startswith("cuda"):
        return {
            "toy": py + ["bench/gpu_toy.py", "--device", device, "--recipes", recipes] + j("toy"),
            "latency": py + ["bench/edit_latency.py", "--device", device, "--dtype", "bf16", "--sizes", "full",
                             "--full-steps", "50", "--repeats", "3"] + j("latency"),
            "train": py + ["bench/train_overhead.py", "--device", device, "--precision", "bf16", "--sizes", "full",
                           "--batch-size", "8", "--grad-checkpointing", "--steps", "5", "--repeats", "2"] + j("train"),
            "memory": py + ["bench/memory.py", "--device", device, "--recipes", "insightedit:2", "--sizes", "full",
                            "--max-batch", "8", "--no-inference"] + j("memory"),
            "model": py + ["bench/memory.py", "--device", "cpu", "--recipes", "insightedit:2", "--sizes", "full",
                           "--max-batch", "8", "--no-inference", "--threads", "4"] + j("model")}
    return {
        "toy": py + ["bench/gpu_toy.py", "--device", "cpu", "--recipes", recipes, "--train-steps", "2",
                     "--edit-steps", "2"] + j("toy"),
        "latency": py + ["bench/edit_latency.py", "--device", "cpu", "--sizes", "toy", "--steps", "2",
                         "--repeats", "1"] + j("latency"),
        "train": py + ["bench/train_overhead.py", "--device", "cpu", "--precision", "bf16", "--sizes", "toy",
                       "--batch-size", "2", "--grad-checkpointing", "--steps", "1", "--repeats", "1"] + j("train"),
        "memory": py + ["bench/memory.py", "--device", "cpu", "--recipes", "insightedit:2", "--sizes", "toy"]
        + j("memory")}  # on the CPU the measured steps are the model's own: no second run


def versions(device: str) -> dict:
    """What this run ran with; nothing here may fail the part (a missing package is reported as such)."""
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    import torch

    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    for name in ("transformers", "diffusers", "huggingface_hub", "safetensors", "numpy", "tokenizers"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
            if name == "diffusers":
                out["diffusers_from"] = os.path.dirname(mod.__file__)
        except ImportError as e:
            out[name] = f"missing ({e})"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GIB,
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                   sdp_flash=torch.backends.cuda.flash_sdp_enabled(),
                   sdp_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                   sdp_cudnn=torch.backends.cuda.cudnn_sdp_enabled(), sdp_math=torch.backends.cuda.math_sdp_enabled())
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = q.stdout.strip()
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()})"
        out["cuda_available"] = torch.cuda.is_available()
    return out


class Log:
    """Everything printed, to the console and OUT/log.txt as it comes."""

    def __init__(self, path: str):
        self.f, self.lock = open(path, "a", encoding="utf-8"), threading.Lock()

    def __call__(self, line: str):
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")
            self.f.flush()


def start(cmd: list[str], log, tag: str) -> tuple[subprocess.Popen, threading.Thread, list]:
    """Start `cmd` in its own process group; a thread copies its output to the log (and keeps it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log(f"[{tag}] {lines[-1]}")

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return proc, t, lines


def finish(proc, thread, lines, limit: float) -> dict:
    """Wait up to `limit` seconds, then kill the whole group -> {status, rc, seconds, output}."""
    t0 = time.perf_counter()
    try:
        rc, status = proc.wait(timeout=max(1.0, limit)), None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, status = proc.wait(), "timeout"
    thread.join(timeout=10)
    status = status or ("ok" if rc == 0 else "failed")
    return dict(status=status, rc=rc, seconds=time.perf_counter() - t0, output="\n".join(lines))


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for log.txt, results.json, summary.md")
    p.add_argument("--device", default="cuda", help="cuda (full sizes) or cpu (toy sizes only)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from " + ", ".join(PARTS))
    p.add_argument("--recipes", default="insightedit,smartedit,ip2p,mindedit", help="the toy part's recipes")
    p.add_argument("--budget", type=float, default=480, help="seconds for all parts together")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or any(s not in PARTS for s in parts):
        print(f"error: --parts {args.parts}: choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if not args.device.startswith(("cuda", "cpu")):
        print(f"error: --device {args.device}: use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, ".parts")
    os.makedirs(work, exist_ok=True)
    log = Log(os.path.join(args.out, "log.txt"))
    deadline = time.perf_counter() + args.budget
    cmds = commands(args.device, work, args.recipes)
    results = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
    background = None
    if "memory" in parts and "model" in cmds:  # the CPU model runs beside the GPU parts
        log(f"== model (background, CPU): {' '.join(cmds['model'][1:])}")
        background = start(cmds["model"], log, "model")
    from summary import write  # bench/summary.py: the tables and targets of OUT/summary.md

    for part in parts:
        left = deadline - time.perf_counter()
        if part == "env":
            try:
                results["parts"]["env"] = dict(status="ok", versions=versions(args.device))
            except Exception as e:  # a broken install must not stop the measurements
                results["parts"]["env"] = dict(status="failed", error=f"{type(e).__name__}: {e}")
            log("== env: " + json.dumps(results["parts"]["env"]))
        elif left < 20:
            results["parts"][part] = dict(status="skipped", reason=f"budget spent ({args.budget:.0f} s)")
            log(f"== {part}: skipped, budget spent")
        else:
            limit = min(LIMITS[part] * (1 if args.device.startswith("cuda") else 2), left)
            log(f"== {part} (limit {limit:.0f} s): {' '.join(cmds[part][1:])}")
            res = finish(*start(cmds[part], log, part), limit)
            res["figures"] = read_json(os.path.join(work, f"{part}.json"))
            results["parts"][part] = res
            log(f"== {part}: {res['status']} (rc {res['rc']}, {res['seconds']:.0f} s)")
        write(args.out, results)
    if background is not None:
        res = finish(*background, max(20.0, deadline - time.perf_counter()))
        res["figures"] = read_json(os.path.join(work, "model.json"))
        results["parts"]["model"] = res
        log(f"== model: {res['status']} (rc {res['rc']}, {res['seconds']:.0f} s)")
    text = write(args.out, results)
    log("\n" + text)
    shutil.rmtree(work, ignore_errors=True)
    bad = [k for k, v in results["parts"].items() if v["status"] != "ok" or v.get("passed") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
