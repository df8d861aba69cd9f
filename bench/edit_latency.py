"""Edit latency against the anchor: our InsightEdit sampler against diffusers' StableDiffusionInstructPix2PixPipeline.

    python bench/edit_latency.py                                  # toy and mid size, CPU, 1 thread
    python bench/edit_latency.py --sizes mid --mid-steps 50 --repeats 3
    python bench/edit_latency.py --device cuda --dtype bf16 --sizes toy,mid,full      # on a GPU

"ours" is `minedit.sampler.edit` on the full stage-3 InsightEdit model (MLLM + Q-Former + BIM + IAA image branch
+ decoupled attention). The "anchor" is diffusers' StableDiffusionInstructPix2PixPipeline built from a stock
UNet2DConditionModel of the same architecture holding our UNet's base weights (checked: both UNets give the same
output without BIM's residual and image tokens), with our VAE, CLIP text encoder and tokenizer and a scheduler
built the same way. Same steps, guidance (s_T 7.5, s_I 1.5), seed and resolution; one edit of batch 1 each,
output_type="pt". After one warm-up edit each, the repeats run interleaved in this process, alternating which
goes first; the figure is the median of the per-repeat ratios ours/anchor. Target (#8): ≤ 1.05× at mid size.
On the CPU the table also gives the median ratio of process CPU time, which other processes on a shared machine
disturb less than wall time (they still compete for caches and memory bandwidth).

Each edit is split by forward hooks into "before the loop" (start → first UNet call: for ours the VAE encode,
the MLLM forward, Q-Former, BIM, IAA and null image tokens; for the anchor the VAE encode and two CLIP text
encodes), "loop" (→ the VAE decoder) and "decode". On CUDA the hooks synchronise at these boundaries only.
MLLM forwards per edit = the LLM decoder's forward passes during one edit (a generate() loop would show one per
token); target exactly 1.

Sizes (bench/common.py): toy, mid, and full (the full preset's architecture with random weights: 7B LLaVA,
SD1.5 UNet, 256 px; CUDA only). Steps: --steps for toy (default 50), --mid-steps for mid (default 20 on CPU, 50
on CUDA), --full-steps for full (default 50). Our extra conditioning is a fixed cost per edit (before the loop,
ours takes a larger multiple of the anchor's time than per step), so fewer steps make the ratio larger: a mid
ratio taken at 20 steps is conservative for 50. --dtype bf16 stores the frozen weights in bf16 (as infer.py
loads a model on CUDA) and runs both editors under bf16 autocast.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter

import torch
from diffusers.utils import logging as diffusers_logging

import common

from minedit import build, runtime
from minedit.errors import UserError, run_cli
from minedit.model import EditModel
from minedit.sampler import edit

SIZES = ("toy", "mid", "full")
INSTRUCTION = "remove the red circle"
SEED = 0


class Probe:
    """Forward hooks on both editors: phase boundaries of one edit and the MLLM's forward counts and time.

    Phase marks: "start" → "loop" (first UNet call) → "decode" (VAE decoder) → "end"; only the first call marks.
    """

    def __init__(self, sync):
        self.sync = sync or (lambda: None)
        self.handles = []
        self.reset()

    def reset(self):
        self.marks, self.counts, self.mllm_s, self._mllm_t0 = {}, Counter(), 0.0, None

    def mark(self, name: str):
        if name not in self.marks:
            self.sync()
            self.marks[name] = time.perf_counter()

    def on_first_call(self, module, name: str):
        self.handles.append(module.register_forward_pre_hook(lambda *_: self.mark(name)))

    def count(self, module, name: str):
        self.handles.append(module.register_forward_hook(lambda *_: self.counts.update([name])))

    def time_calls(self, module):
        def pre(*_):
            self.sync()
            self._mllm_t0 = time.perf_counter()

        def post(*_):
            self.sync()
            self.mllm_s += time.perf_counter() - self._mllm_t0

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def run(self, fn) -> dict:
        """One edit -> {total, cond, loop, decode, mllm} wall seconds, its CPU seconds and the forward counts."""
        self.reset()
        self.mark("start")
        cpu0 = time.process_time()
        fn()
        self.mark("end")
        m = self.marks
        return dict(total=m["end"] - m["start"], cond=m["loop"] - m["start"], loop=m["decode"] - m["loop"],
                    decode=m["end"] - m["decode"], mllm=self.mllm_s, cpu=time.process_time() - cpu0,
                    counts=dict(self.counts))


def stock_unet_like(model: EditModel) -> torch.nn.Module:
    """A stock diffusers UNet of our architecture (default attention processors, plain conv_in) holding our UNet's
    base weights: everything but the decoupled attention's to_k_ip / to_v_ip."""
    from diffusers import UNet2DConditionModel

    with torch.device(model.device):
        unet = UNet2DConditionModel(**build.unet_kwargs(model.cfg))
    base = {k: v for k, v in model.unet.state_dict().items() if ".processor." not in k}
    unet.load_state_dict(base, strict=True)
    return unet.eval()


def check_same_unet(model: EditModel, stock) -> None:
    """Without BIM's residual and image tokens our UNet must compute what the stock one does."""
    cfg = model.cfg
    h = cfg.resolution // cfg.latent_factor
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, h, h, generator=gen).to(model.device)
    ctx = torch.randn(1, cfg.text_max_length, cfg.text_hidden, generator=gen).to(model.device)
    t = torch.tensor([500], device=model.device)
    with torch.no_grad():
        ours = model.unet(x, t, encoder_hidden_states=ctx).sample
        theirs = stock(x, t, encoder_hidden_states=ctx).sample
    tol = 1e-3 if model.device.type == "cuda" else 1e-5  # cuDNN convolutions may use TF32
    if not torch.allclose(ours, theirs, atol=tol, rtol=10 * tol):
        raise RuntimeError(f"the anchor's UNet differs from ours: max |Δ| {(ours - theirs).abs().max().item():.2e}")


def build_editors(size: str, args, device: torch.device):
    cfg = common.config(size, "insightedit", stage=3)
    model = common.build_model(cfg, size, device).requires_grad_(False).eval()
    stock = stock_unet_like(model).requires_grad_(False)
    check_same_unet(model, stock)
    if args.dtype == "bf16":  # as infer.py's load_model: frozen parts in bf16, the trainable ones fp32
        model.set_stage(3, torch.bfloat16)
        model.requires_grad_(False)
        stock.to(torch.bfloat16)
    import diffusers

    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.text_tokenizer, unet=stock,
        scheduler=build.build_sampler_scheduler(args.scheduler, model.noise_scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return model, stock, pipe


def bench(size: str, steps: int, args, device: torch.device) -> dict:
    model, stock, pipe = build_editors(size, args, device)
    res = model.cfg.resolution
    image = torch.rand(1, 3, res, res, generator=torch.Generator().manual_seed(SEED)).to(device)  # [0, 1]
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def ours():
        with autocast:
            edit(model, image * 2 - 1, [INSTRUCTION], steps=steps, text_guidance=7.5, image_guidance=1.5,
                 scheduler=args.scheduler, seed=SEED)

    def anchor():
        with autocast:
            pipe(INSTRUCTION, image=image, num_inference_steps=steps, guidance_scale=7.5, image_guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(SEED), output_type="pt")

    probe = Probe(common.sync_for(device))
    for unet in (model.unet, stock):
        probe.on_first_call(unet, "loop")
    probe.on_first_call(model.vae.decoder, "decode")  # the VAE is shared
    llava = model.mllm
    probe.count(llava, "LlavaForConditionalGeneration")
    probe.count(llava.model, "LlavaModel")
    probe.count(llava.model.language_model, "decoder")
    probe.count(llava.model.vision_tower, "vision tower")
    probe.time_calls(llava.model)

    probe.run(ours)  # warm-up (and our null text, computed once per process)
    probe.run(anchor)
    runs = {"ours": [], "anchor": []}
    for r in range(args.repeats):
        order = ("ours", "anchor") if r % 2 == 0 else ("anchor", "ours")
        for who in order:
            runs[who].append(probe.run(ours if who == "ours" else anchor))
        print(f"  {size} repeat {r + 1}: ours {runs['ours'][-1]['total']:.3f} s, "
              f"anchor {runs['anchor'][-1]['total']:.3f} s", flush=True)
    for h in probe.handles:
        h.remove()
    forwards = sorted({run["counts"].get("decoder", 0) for run in runs["ours"]})
    anchor_forwards = sorted({run["counts"].get("decoder", 0) for run in runs["anchor"]})
    last = runs["ours"][-1]["counts"]
    print(f"  {size} MLLM forwards per edit: {','.join(map(str, forwards))} (LLM decoder passes; LlavaModel "
          f"{last.get('LlavaModel', 0)}, LlavaForConditionalGeneration.forward "
          f"{last.get('LlavaForConditionalGeneration', 0)}, vision tower {last.get('vision tower', 0)}; "
          f"anchor {','.join(map(str, anchor_forwards))})", flush=True)
    med = lambda who, key: common.median([run[key] for run in runs[who]])  # noqa: E731
    ratio = lambda key: common.median([a[key] / b[key] for a, b in zip(runs["ours"], runs["anchor"])])  # noqa: E731
    return dict(size=size, res=res, steps=steps, forwards=forwards, ratio=ratio("total"), cpu_ratio=ratio("cpu"),
                **{f"{who}_{key}": med(who, key) for who in runs for key in ("total", "cond", "loop", "decode",
                                                                                "mllm")})


def check_args(args) -> list[str]:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        raise UserError(f"--sizes {args.sizes}: choose from {', '.join(SIZES)}, comma-separated")
    for name in ("steps", "mid_steps", "full_steps", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    try:
        build.build_sampler_scheduler(args.scheduler, build.build_noise_scheduler(common.config("toy")))
    except ValueError as e:
        raise UserError(f"--scheduler: {e}") from None
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--sizes", default="toy,mid", help="toy, mid, full (full: CUDA only), comma-separated")
    p.add_argument("--steps", type=int, default=50, help="denoising steps at toy size")
    p.add_argument("--mid-steps", type=int, default=None, help="denoising steps at mid size (default: 20 on CPU, "
                   "50 on CUDA; fewer steps only make our fixed conditioning cost look larger)")
    p.add_argument("--full-steps", type=int, default=50, help="denoising steps at full size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: both editors under bf16 autocast")
    p.add_argument("--scheduler", default="DDIMScheduler", help="a diffusers scheduler class name")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", help="also write the figures (seconds) to this file")
    args = p.parse_args(argv)
    sizes = check_args(args)
    device = common.pick_device(args.device)
    if "full" in sizes and device.type != "cuda":
        raise UserError("--sizes full needs --device cuda (a 7B model's edits take minutes on a CPU, and its fp32 "
                        "initialisation needs 30 GB of RAM)")
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # casting the stock UNet to bf16 warns about from_pretrained
    print(common.machine(device))
    results = []
    for size in sizes:
        steps = {"toy": args.steps, "full": args.full_steps,
                 "mid": args.mid_steps or (50 if device.type == "cuda" else 20)}[size]
        results.append(bench(size, steps, args, device))

    print(f"\n{args.scheduler}, s_T 7.5, s_I 1.5, batch 1, {args.dtype}, {device.type}; "
          f"median of {args.repeats} interleaved repeats")
    print("\n| size | px | steps | ours s/edit | ip2p pipeline s/edit | ratio ours/anchor | CPU-time ratio | "
          "MLLM forwards/edit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cpu_ratio = f"{r['cpu_ratio']:.3f}×" if device.type == "cpu" else "–"
        print(f"| {r['size']} | {r['res']} | {r['steps']} | {r['ours_total']:.4f} | {r['anchor_total']:.4f} | "
              f"{r['ratio']:.3f}× | {cpu_ratio} | {','.join(map(str, r['forwards']))} |")
    print("\n| size | editor | before loop ms | of it MLLM ms | loop ms | per step ms | decode ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for who, name in (("ours", "ours"), ("anchor", "ip2p pipeline")):
            mllm = f"{r['ours_mllm'] * 1e3:.1f}" if who == "ours" else "–"
            print(f"| {r['size']} | {name} | {r[f'{who}_cond'] * 1e3:.1f} | {mllm} | {r[f'{who}_loop'] * 1e3:.1f} | "
                  f"{r[f'{who}_loop'] * 1e3 / r['steps']:.2f} | {r[f'{who}_decode'] * 1e3:.1f} |")
    if args.json:
        common.write_json(args.json, dict(machine=common.machine(device), dtype=args.dtype, scheduler=args.scheduler,
                                          repeats=args.repeats, results=results))
    return 0


if __name__ == "__main__":
    run_cli(main)
