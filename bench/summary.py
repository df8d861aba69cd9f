"""OUT/summary.md and OUT/results.json of bench/gpu_check.py: versions, parts, targets, memory against its model.

Pure bookkeeping on the parts' JSON figures (bench/gpu_toy.py, edit_latency.py, train_overhead.py, memory.py
--json); `write` is called after every part, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import json
import os

GIB = 2 ** 30
LATENCY_TARGET_S, SAMPLES_TARGET = 0.5, 25.0
MEMORY_TOL = 0.10  # the CUDA allocator's peak within 10 % of the shape-only model's: the model holds


def verdict(size: str, met: bool) -> str:
    """Met or not: the targets are for the full size; a toy or mid figure only shows the part ran."""
    return ("met" if met else "not met") if size == "full" else "– (the target is for full size)"


def figures(results: dict, part: str):
    return (results["parts"].get(part) or {}).get("figures")


def tables(output: str) -> str:
    """The Markdown tables (and the line above each) a part printed."""
    lines, out = output.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            above = [x for x in lines[max(0, i - 2):i] if x.strip()]
            out += [""] + [y for x in above[-1:] if not x.startswith("|") for y in (x, "")]
        if line.startswith("|"):
            out.append(line)
    return "\n".join(out).strip()


def toy_rows(results: dict) -> list[str]:
    rows = figures(results, "toy")
    if not rows:
        return []
    bad = [f"{r['recipe']}·{r['stage']}" for r in rows if not r["ok"]]
    cut = results["parts"]["toy"]["status"] == "timeout"  # the rows done before the part's time limit
    results["parts"]["toy"]["passed"] = not bad and not cut
    return [f"| toy correctness, every recipe × stage (bf16 and fp16 + GradScaler lower the loss, fused SDPA, "
            f"device edit = CPU fp32 edit) | {len(rows) - len(bad)} of {len(rows)} pass"
            + (f" (failed: {', '.join(bad)})" if bad else "") + (", then the part's time limit" if cut else "")
            + f" | {'**failed**' if bad else 'incomplete' if cut else 'passed'} |"]


def latency_rows(results: dict) -> list[str]:
    fig = figures(results, "latency")
    out = []
    for r in (fig or {}).get("results", []):
        met = r["ours_total"] <= LATENCY_TARGET_S
        out.append(f"| edit latency ≤ {LATENCY_TARGET_S} s ({r['size']}, {r['res']} px, {r['steps']} steps, "
                   f"{fig['dtype']}, MLLM included) | ours {r['ours_total']:.3f} s (MLLM {r['ours_mllm'] * 1e3:.0f} "
                   f"ms); ip2p pipeline {r['anchor_total']:.3f} s; ratio {r['ratio']:.3f}× | "
                   f"{verdict(r['size'], met)} |")
    return out


def train_rows(results: dict) -> list[str]:
    fig = figures(results, "train")
    out = []
    for r in (fig or {}).get("results", []):
        rate = r["batch"] / r["bare"]
        peak = f"; peak {r['peak'] / GIB:.2f} GiB allocated, {r['peak_reserved'] / GIB:.2f} reserved" \
            if r.get("peak") else ""
        ckpt = ", gradient checkpointing" if fig["grad_checkpointing"] else ""
        out.append(f"| ≥ {SAMPLES_TARGET:g} stage-2 samples/s ({r['size']}, batch {r['batch']}, {fig['precision']}"
                   f"{ckpt}) | {rate:.2f} samples/s ({r['bare'] * 1e3:.0f} ms/step){peak} | "
                   f"{verdict(r['size'], rate >= SAMPLES_TARGET)} |")
    return out


def memory_section(results: dict) -> list[str]:
    """Peaks measured on the device next to memory.py's model (the CPU shape-only steps) of the same steps."""
    measured = figures(results, "memory")
    model = figures(results, "model") or measured  # CPU mode: the measured steps are the model's own
    if not measured or not model or not measured["measured"] or not model["measured"]:
        return []
    import memory  # bench/memory.py: the fit rule

    m_dev, m_cpu, w = measured["measured"][0], model["measured"][0], model["weights"][0]
    out = ["", "## Memory: measured against bench/memory.py's model", "",
           f"{w['recipe']} stage {w['stage']}, {m_dev['size']} size, batch ladder as measured; peak = bytes above "
           "the weights during forward + backward (gradients included). Model: memory.py's CPU shape-only steps; "
           "measured: the device allocator's counters.", "",
           "| checkpointing | batch | model peak GiB | measured peak GiB | measured / model |", "|---|---|---|---|---|"]
    worst = 0.0
    for mode in memory.modes(m_cpu):
        got = {r["batch"]: r["peak"] for r in m_dev["runs"].get(mode, [])}
        for r in m_cpu["runs"][mode]:
            if r["batch"] in got:
                ratio = got[r["batch"]] / r["peak"]
                worst = max(worst, abs(ratio - 1))
                out.append(f"| {'yes' if mode == 'ckpt' else 'no'} | {r['batch']} | {r['peak'] / GIB:.2f} | "
                           f"{got[r['batch']] / GIB:.2f} | {ratio:.3f} |")
    out.append(f"\nLargest deviation {worst * 100:.1f} % (the model holds if ≤ {MEMORY_TOL * 100:.0f} %: "
               f"{'yes' if worst <= MEMORY_TOL else '**no**'}).")
    train = figures(results, "train")
    runs = m_cpu["runs"].get("ckpt" if train and train["grad_checkpointing"] else "plain", [])
    for r in (train or {}).get("results", []):
        at = memory.peak_at(runs, r["batch"]) if runs else None
        if r.get("peak") and at is not None:
            tensors = w["frozen_bytes"] + w["trainable_bytes"] + w["adamw_bytes"] + \
                max(at, w["grad_bytes"] + m_cpu["step_temporaries"])
            out.append(f"\nThe training part's step (batch {r['batch']}): allocator peak {r['peak'] / GIB:.2f} GiB "
                       f"(reserved {r['peak_reserved'] / GIB:.2f}) against the model's tensors "
                       f"{tensors / GIB:.2f} GiB and its need {memory.need(w, m_cpu, at) / GIB:.2f} GiB (× "
                       f"{memory.FRAGMENTATION} + {memory.ALLOWANCE / GIB:.0f} GiB).")
    return out


def versions_section(results: dict) -> list[str]:
    env = (results["parts"].get("env") or {}).get("versions")
    if not env:
        return []
    return ["", "## Versions", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]


def write(out_dir: str, results: dict) -> str:
    """(Re)write OUT/summary.md and OUT/results.json from what the parts have left so far -> the summary."""
    env = (results["parts"].get("env") or {}).get("versions", {})
    head = [f"# minedit GPU check: {env.get('device', results['device'])}",
            f"\n{results['started']}; python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA "
            f"{env.get('torch_cuda')}), transformers {env.get('transformers', '?')}, diffusers "
            f"{env.get('diffusers', '?')}", "", "| part | status | seconds |", "|---|---|---|"]
    head += [f"| {k} | {v['status']}{' (' + v['reason'] + ')' if v.get('reason') else ''} | "
             f"{v.get('seconds', 0):.0f} |" for k, v in results["parts"].items()]
    targets = toy_rows(results) + latency_rows(results) + train_rows(results)
    body = ["", "## Against the targets", "", "| target | figure | status |", "|---|---|---|"] + targets \
        if targets else []
    body += memory_section(results)
    for part in ("toy", "latency", "train", "memory"):
        text = tables((results["parts"].get(part) or {}).get("output", ""))
        if text:
            body += ["", f"## {part}: the tables it printed", "", text]
    text = "\n".join(head + body + versions_section(results)) + "\n"
    for name, data in (("summary.md", text), ("results.json", json.dumps(results, indent=1))):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, name))
    return text
