"""Memory of the full model per recipe × stage: weights, gradients, AdamW state, activations, and which GPU fits it.

    python bench/memory.py                              # every full recipe × stage, measured on the CPU (minutes)
    python bench/memory.py --no-measure                 # the weights-only table (seconds)
    python bench/memory.py --recipes insightedit:2,ip2p --json mem.json   # RECIPE or RECIPE:STAGE
    python bench/memory.py --check                      # the method's check: shape-only vs computed, toy size
    python bench/memory.py --device cuda --sizes mid,full   # on a GPU: real compute, torch.cuda peak counters

Weights (no measurement; built on `meta`, split by `EditModel.set_stage`): what train.py allocates. Trainable
parameters in fp32, frozen ones in the precision's dtype (the full preset's bf16: runtime.frozen_dtype), buffers
as built. The [MM] rows train as whole embedding and lm_head matrices under a gradient mask, so those two
matrices count whole in fp32 (the dry-run table counts only their r new rows as trainable). Gradients: one fp32
tensor per trainable parameter. AdamW: exp_avg and exp_avg_sq, fp32.

Activations are measured on the full model itself: every part at full width, all 32 (MIND-Edit: 28) LLM layers,
256 px, one training step through `EditModel.forward`, backward, clip_grad_norm_ and AdamW (foreach, as on CUDA),
under the bf16 autocast that train.py uses. This CPU has no bf16 matrix units (a bf16 matmul runs at
~0.2 GFLOP/s), so the step is run *shape-only* (class Ledger): every op goes through its real dispatch
(autocast casts and their cache, autograd and what it saves, gradient checkpointing and its recompute, the
[MM] gradient-mask hooks), but an op whose results are floating tensors of more than one element is not computed
— its outputs get the shapes, dtypes and strides of the op's meta kernel and are allocated uninitialised.
Integer and boolean ops and scalars run for real, so token ids, [MM] positions, masks and AdamW's step counts
are right. The weights are allocated the same way (never touched), so the full model costs ~1 GB of RAM here.
Two figures per step, in bytes of tensor storage:
  * held: what is alive at the end of the forward beyond the weights = what autograd keeps for backward
    (attributed to parts by forward hooks; deduplicated by storage) + anything else still referenced;
  * peak: the most bytes alive at any moment of forward + backward (gradients included, as they appear).
Per sample = (batch 2) − (batch 1); fixed = batch 1 − per sample. With --device cuda the steps are computed
for real, on random weights built on the GPU (bench/common.py), and the peaks come from torch.cuda's allocator
counters (the ladder also stops where the GPU runs out of memory). `--check` runs the toy model both ways
(computed and shape-only, fp32) and prints the two peaks: they agree to < 1 % (oneDNN returns channels-last
outputs for some CPU convolutions where the meta kernel — like cuDNN for contiguous inputs — does not).
Attention: the CPU runs SDPA's flash kernel (`_scaled_dot_product_flash_attention_for_cpu`), which saves the
output and the log-sum-exp, as flash / memory-efficient attention does on a GPU; the script lists the attention
kernels it saw and counts saved tensors shaped like attention maps (B×heads×Lq×Lk), which should be none.

Fit: need(B) = 1.10 × (weights + AdamW + max(peak(B), gradients + optimizer-step temporaries)) + 2 GiB,
the 10 % for allocator rounding and fragmentation and kernel workspaces that tensors do not show, the 2 GiB for
the CUDA context and cuBLAS/cuDNN workspaces. One GPU, no DDP (torchrun's DDP adds gradient buckets of the
gradients' size). A GPU of "24 / 40 / 80 GB" is taken as 24 / 40 / 80 GiB (GB below means GiB = 2^30 bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from transformers.utils import logging as transformers_logging

import common

from minedit import runtime, training
from minedit.config import RECIPES
from minedit.errors import UserError, run_cli
from minedit.model import EditModel
from minedit.presets import preset
from minedit.sampler import edit

GIB = 2 ** 30
GPUS = (24, 40, 80)          # GiB
ALLOWANCE = 2 * GIB          # CUDA context + cuBLAS/cuDNN workspaces
FRAGMENTATION = 1.10         # allocator rounding/fragmentation and kernel temporaries not visible as tensors
SIZES = ("toy", "mid", "full")
MAX_BATCH = 1024             # the full model's batch ladder 1, 2, 4, ... stops here at the latest
TARGET = ("insightedit", 2, 80, 8)  # #8: full insightedit stage 2 on one 80 GB GPU at batch >= 8, 256 px
SMARTEDIT = ("SmartEdit (published, as quoted in #8): 7B inference needs an A100-40G because its MLLM runs in fp32; "
             "training used DeepSpeed ZeRO-2 over 8 GPUs.")
# A 35-word instruction: with LLaVA-1.5's "USER: <image>\n... ASSISTANT:" template about 40 text tokens, as a
# long real instruction gives (the toy word-level tokenizer makes one token per word).
INSTRUCTION = ("replace the small red car parked on the left side of the quiet street with a bright blue bicycle "
               "leaning against the old brick wall next to the bakery window in the soft morning light")


# ----------------------------------------------------------------------------------------------------------------
# Weights, gradients, AdamW state: exact, from the model built on meta
def stage_model(model: EditModel, stage: int, frozen_dtype: torch.dtype) -> dict:
    """model.set_stage without transformers' deprecation notice for gradient_checkpointing_enable."""
    with warnings.catch_warnings():  # transformers' deprecation notice for gradient_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        return model.set_stage(stage, frozen_dtype)


def weights_row(model: EditModel, stage: int) -> dict:
    """Bytes train.py allocates for the stage: frozen (frozen_dtype) and trainable (fp32) weights, grads, AdamW."""
    cfg = model.cfg
    frozen_dtype = runtime.DTYPES[cfg.precision]
    table = stage_model(model, stage, frozen_dtype)
    size = torch.empty((), dtype=frozen_dtype).element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    grads = 4 * trainable
    return dict(recipe=cfg.recipe, stage=stage, precision=cfg.precision,
                table={k: [n, on] for k, (n, on) in table.items()},
                table_trainable=sum(n for n, on in table.values() if on),
                table_frozen=sum(n for n, on in table.values() if not on),
                trainable_params=trainable, frozen_params=frozen, buffer_bytes=buffers,
                frozen_bytes=size * frozen + buffers, trainable_bytes=4 * trainable, grad_bytes=grads,
                adamw_bytes=2 * grads)


def weights_rows(selection: dict) -> list[dict]:
    """{recipe: [stages]} -> one row per recipe × stage (one meta model per recipe)."""
    rows = []
    for recipe, stages in selection.items():
        model = EditModel(preset(recipe, "full"), meta=True)
        rows += [weights_row(model, stage) for stage in stages]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Measuring: the shape-only ledger (CPU) or the CUDA allocator's counters
def _meta_like(x):
    if isinstance(x, torch.device):
        return torch.device("meta")
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an in-place or out= op writes, read off its schema."""
    schema = func._schema
    values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
    return [t for a, v in zip(schema.arguments, values) if a.alias_info is not None and a.alias_info.is_write
            for t in tree_leaves(v) if isinstance(t, torch.Tensor)]


def _skippable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 1


_NOTHING = object()  # an in-place op with no results, skipped
_RESULTS = {}  # op signature -> (results' tree, their shapes/strides/dtypes) or None (compute it): ops repeat


def _signature(func, args, kwargs):
    """The op with its arguments' metadata (tensors: shape, stride, dtype, device; the rest: values), hashable."""
    leaves, _ = tree_flatten((args, kwargs))
    key = (func, tuple(kwargs), *((tuple(x.shape), x.stride(), x.dtype, x.device.type)
                                  if isinstance(x, torch.Tensor) else x for x in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _meta_results(func, args, kwargs):
    """(tree spec, leaves with tensors as (shape, stride, dtype)) of the op's meta results, or None when the op
    must be computed: no meta kernel, a data-dependent shape (nonzero, boolean indexing), or a result that is not
    a floating tensor of more than one element (a boolean beside floating ones is dropout's mask, whose values
    do not matter either)."""
    try:
        out = func(*tree_map(_meta_like, args), **tree_map(_meta_like, kwargs))
    except Exception:
        return None
    leaves, spec = tree_flatten(out)
    floating = [t for t in leaves if isinstance(t, torch.Tensor) and t.dtype != torch.bool]
    if not floating or not all(map(_skippable, floating)):
        return None
    return spec, [(t.shape, t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t for t in leaves]


def _allocate(spec, leaves):
    """Uninitialised CPU tensors in the place of the meta results."""
    return tree_unflatten([torch.empty_strided(*x[:2], dtype=x[2]) if isinstance(x, tuple) else x
                           for x in leaves], spec)


class Ledger(TorchDispatchMode):
    """Live bytes of every storage created while active, and their peak. With compute=False, floating results of
    more than one element are not computed (see the module docstring): functional ops get uninitialised outputs
    shaped by their meta kernels, in-place / out= ops on such tensors are skipped."""

    def __init__(self, compute: bool = False):
        super().__init__()
        self.compute, self.live, self.now, self.peak, self.ops, self.made_by = compute, {}, 0, 0, set(), {}

    def reset_peak(self):
        self.peak = self.now

    def _free(self, key):
        self.now -= self.live.pop(key)
        del self.made_by[key]

    def _shape_only(self, func, args, kwargs):
        """The op's results without computing them, or None when it must run for real."""
        schema = func._schema
        if schema.is_mutable:
            written = _written(func, args, kwargs)
            if not written or not all(map(_skippable, written)):
                return None
            if not schema.returns:  # e.g. AdamW's _foreach_lerp_
                return _NOTHING
            if len(schema.returns) == 1 and schema.returns[0].alias_info is not None and len(written) == 1:
                return written[0]
            return None
        if any(r.alias_info is not None for r in schema.returns):  # views run for real (they allocate nothing)
            return None
        key = _signature(func, args, kwargs)
        if key is None or key not in _RESULTS:
            found = _meta_results(func, args, kwargs)
            if key is None:
                return found and _allocate(*found)
            _RESULTS[key] = found
        return _RESULTS[key] and _allocate(*_RESULTS[key])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(func.overloadpacket.__name__)
        out = None if self.compute else self._shape_only(func, args, kwargs)
        if out is _NOTHING:
            return None
        if out is None:
            out = func(*args, **kwargs)
        returns = func._schema.returns
        results = out if len(returns) > 1 else (out,)
        for ret, result in zip(returns, results):
            if ret.alias_info is not None:  # a view or the written input: no new storage
                continue
            self._count(result, func.overloadpacket.__name__)
        return out

    def _count(self, result, op: str):
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live[key], self.made_by[key] = nbytes, op
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)


class CudaMeter:
    """The same interface over torch.cuda's allocator counters (real compute)."""

    def __init__(self, device):
        self.device, self.ops = device, set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def now(self):
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self):
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self):
        torch.cuda.reset_peak_memory_stats(self.device)


def meter_for(device: torch.device):
    return CudaMeter(device) if device.type == "cuda" else Ledger()


# ----------------------------------------------------------------------------------------------------------------
# The model to measure
def measured_config(size: str, recipe: str, stage: int, ckpt: bool = False, precision: str | None = None):
    """The size's config (common.config: built from its architecture fields, no hub access); toy and mid take the
    full preset's precision too unless given."""
    # common.config("mid", "mindedit") keeps the toy vision_head_layer 3 with MID's 2 LLM layers
    over = ["--vision_head_layer=2"] if size == "mid" and recipe == "mindedit" else []
    cfg = common.config(size, recipe, stage, over)
    cfg.grad_checkpointing = ckpt
    cfg.precision = precision or preset(recipe, "full").precision
    return cfg.validate()


def materialize(cfg, size: str, stage: int, device: torch.device, meter, frozen_dtype: torch.dtype) -> EditModel:
    """The model train.py would hold for the stage: random weights (common.build_model), except `full` on the CPU,
    which is built on meta and then given uninitialised storage inside the Ledger (for shape-only steps); its
    embedding matrices get the real vocabulary's rows, as common.build_model gives them."""
    if size != "full" or device.type == "cuda":
        model = common.build_model(cfg, size, device)
        stage_model(model, stage, frozen_dtype)
        return model
    model = EditModel(cfg, meta=True)
    if cfg.uses_mllm:
        rows = cfg.llm_vocab + (cfg.num_mm_tokens if cfg.uses_mm_tokens else 0)
        model.mllm.resize_token_embeddings(rows, mean_resizing=False)
    with meter:
        model.to_empty(device=device)
        model.meta = False  # from here on an ordinary model: set_stage casts, masks and checkpoints for real
        stage_model(model, stage, frozen_dtype)
    return model


def make_batch(cfg, b: int, device: torch.device) -> dict:
    """A training batch in collate's format for every stage (unused keys are ignored), made on the device inside
    the meter: a Ledger allocates its images without touching them (grey images: memory does not depend on the
    pixels, and the ladder's batch-1024 images would otherwise cost 2.4 GB of real RAM)."""
    image = lambda: torch.zeros(b, 3, cfg.resolution, cfg.resolution, device=device)  # noqa: E731
    return {"source": image(), "target": image(), "image": image(), "instruction": [INSTRUCTION] * b,
            "optimized_instruction": [INSTRUCTION] * b, "caption": [INSTRUCTION] * b}


class Held:
    """Saved-for-backward bytes by part: forward hooks keep the stack of running parts, and a saved_tensors_hooks
    pack hook files each saved storage once under the outermost (weights excluded). Also: the bytes of saved
    attention probabilities (B×heads×Lq×Lk made by a softmax: math attention; a Ledger knows which op made a
    storage) and the LLM's sequence length."""

    def __init__(self, model: EditModel, meter):
        self.stack, self.bytes, self.seen, self.maps, self.seq = [], {}, set(), 0, None
        self.made_by = getattr(meter, "made_by", {})
        self.weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.handles = []
        # Every submodule pushes its part (its top-level name): parts are often entered below their top module
        # (mm_forward calls mllm.model). The hooks return None: a value would replace the module's output.
        for name, module in model.named_modules():
            if name:
                part = name.split(".")[0]
                self.handles += [
                    module.register_forward_pre_hook(lambda *_, p=part: self.stack.append(p) and None),
                    module.register_forward_hook(lambda *_: self.stack.pop() and None, always_call=True)]
        if model.cfg.uses_mllm:
            lm = model.mllm.model.language_model
            self.handles.append(lm.register_forward_pre_hook(self._length, with_kwargs=True))

    def _length(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        self.seq = x.shape[1] if x is not None else kwargs["input_ids"].shape[1]

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() and key not in self.seen and key not in self.weights:
            self.seen.add(key)
            part = self.stack[0] if self.stack else "other"
            self.bytes[part] = self.bytes.get(part, 0) + storage.nbytes()
            if t.dim() >= 3 and self.made_by.get(key) in ("_softmax", "_safe_softmax"):
                self.maps += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def close(self):
        for h in self.handles:
            h.remove()


def measure_step(model: EditModel, stage: int, b: int, meter, rt) -> dict:
    """One forward + backward at batch b: held at the forward's end (by part), peak, gradients (bytes)."""
    held = Held(model, meter)
    torch.manual_seed(0)  # the model's own draws (noise, timesteps, guidance dropout): the same in every run
    model.zero_grad(set_to_none=True)
    try:
        with meter:
            base = meter.now
            meter.reset_peak()
            batch = make_batch(model.cfg, b, rt.device)
            with held.hooks(), rt.autocast():
                loss, _ = model(batch, stage)
            loss.backward()
            del loss, batch
            peak = meter.peak - base
            grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
            model.zero_grad(set_to_none=True)
    finally:
        held.close()
    return dict(batch=b, held=sum(held.bytes.values()), held_by_part=held.bytes, peak=peak,
                grads=grads, attention_map_bytes=held.maps, llm_length=held.seq)


def measure_optimizer(model: EditModel, stage: int, meter, rt) -> dict:
    """Two steps as train.py takes them (batch 1): AdamW's state, and the temporaries of clip_grad_norm_ +
    AdamW.step above gradients + state in the second (steady) step."""
    cfg = model.cfg
    params = model.trainable_parameters()
    with meter:
        batch = make_batch(cfg, 1, rt.device)
        optimizer = torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(0.9, 0.999), foreach=True)
        for _ in range(2):
            with rt.autocast():
                loss, _ = model(batch, stage)
            loss.backward()
            del loss
            before = meter.now
            meter.reset_peak()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            temporaries = meter.peak - before
            optimizer.zero_grad(set_to_none=True)
        state = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
    return dict(state=state, step_temporaries=temporaries)


def checkpointing_applies(model: EditModel) -> bool:
    """Whether set_stage turned gradient checkpointing on anywhere (it does only for a trainable UNet or LoRA)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def measure_stage(size: str, w: dict, device: torch.device, log, max_batch: int = MAX_BATCH) -> dict:
    """Without and with gradient checkpointing: steps at batches 1, 2 (toy, mid) or 1, 2, 4, ... until the full
    model no longer fits the largest GPU (or `max_batch`); and the optimizer step."""
    recipe, stage = w["recipe"], w["stage"]
    out = dict(size=size, recipe=recipe, stage=stage, runs={}, ckpt_applies=True)
    for mode in ("plain", "ckpt"):
        cfg = measured_config(size, recipe, stage, mode == "ckpt")
        rt = runtime.Runtime(device=device, precision=cfg.precision)
        model = materialize(cfg, size, stage, device, meter_for(device), rt.frozen_dtype).train()
        if mode == "ckpt" and not checkpointing_applies(model):
            out["runs"]["ckpt"], out["ckpt_applies"] = out["runs"]["plain"], False
            continue
        if mode == "plain":
            out["weight_bytes"] = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
            out.update(measure_optimizer(model, stage, meter_for(device), rt))
        runs, b = [], 1
        while True:
            meter = meter_for(device)
            try:
                runs.append(measure_step(model, stage, b, meter, rt))
            except torch.cuda.OutOfMemoryError:  # on a GPU the ladder ends where the GPU does
                out.setdefault("oom_at", {})[mode] = b  # noted under the fit table
                torch.cuda.empty_cache()
                break
            if mode == "plain" and b == 1:
                out["attention_kernels"] = sorted(op for op in meter.ops if "attention" in op)
            if b >= 2 and (size != "full" or 2 * b > max_batch
                           or need(w, out, runs[-1]["peak"]) > max(GPUS) * GIB):
                break
            b *= 2
        out["runs"][mode] = runs
        log(f"  {size} {recipe} stage {stage} {mode}: peak " + ", ".join(
            f"{r['peak'] / GIB:.2f} GB at batch {r['batch']}" for r in runs))
        del model
    return out


def measure_inference(device: torch.device, log) -> list[dict]:
    """Full insightedit (stage 3) edits one 256-px image as infer.py does (three-branch guidance: UNet batch 3),
    2 steps (the per-step memory does not depend on the count): weights (as load_model stores them) and peak."""
    rows = []
    for name, precision, mllm_fp32 in (("bf16 (infer.py's CUDA default)", "bf16", False),
                                       ("bf16, MLLM in fp32 (SmartEdit's split)", "bf16", True),
                                       ("fp32 (--precision fp32)", "fp32", False)):
        cfg = measured_config("full", "insightedit", 3, precision=precision)
        rt = runtime.Runtime(device=device, precision=precision)
        meter = meter_for(device)
        model = materialize(cfg, "full", 3, device, meter, rt.frozen_dtype)
        with meter:
            model.requires_grad_(False).eval()  # as minedit.model.load_model
            if mllm_fp32:
                model.mllm.float()
        weights = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
        image = torch.rand(1, 3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(0))
        meter = meter_for(device)
        with meter:
            base = meter.now
            meter.reset_peak()
            with rt.autocast():
                edit(model, image * 2 - 1, [INSTRUCTION], steps=2, scheduler=cfg.scheduler)
            peak = meter.peak - base
        rows.append(dict(name=name, weights=weights, peak=peak))
        log(f"  inference {name}: weights {weights / GIB:.2f} GB, peak above them {peak / GIB:.2f} GB")
        del model
    return rows


def check_rows(selection: dict, log) -> list[dict]:
    """Toy size, fp32, batch 2: the same step computed and shape-only (the method's check), with checkpointing
    too where set_stage applies it."""
    rows = []
    cpu = torch.device("cpu")
    rt = runtime.Runtime(device=cpu, precision="fp32")
    for recipe, stages in selection.items():
        for stage in stages:
            for ckpt in (False, True):
                got = {}
                for compute in (True, False):
                    cfg = measured_config("toy", recipe, stage, ckpt, precision="fp32")
                    model = materialize(cfg, "toy", stage, cpu, Ledger(), torch.float32).train()
                    if ckpt and not checkpointing_applies(model):
                        break
                    got[compute] = measure_step(model, stage, 2, Ledger(compute), rt)
                if got:
                    rows.append(dict(recipe=recipe, stage=stage, ckpt=ckpt, computed=got[True],
                                     shape_only=got[False]))
            log(f"  check {recipe} stage {stage} done")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Fit and tables
def linear(runs: list[dict], key: str) -> tuple[float, float]:
    """(fixed, per sample) from the batch-1 and batch-2 runs."""
    per = runs[1][key] - runs[0][key]
    return runs[0][key] - per, per


def need(w: dict, m: dict, peak: float) -> float:
    """Bytes a GPU needs for a step whose forward + backward peak is `peak` (see the module docstring)."""
    dynamic = max(peak, w["grad_bytes"] + m["step_temporaries"])
    return FRAGMENTATION * (w["frozen_bytes"] + w["trainable_bytes"] + w["adamw_bytes"] + dynamic) + ALLOWANCE


def peak_at(runs: list[dict], b: int) -> float | None:
    """The peak at batch b, interpolated between the measured batches (a step's peak is a maximum over moments
    of linear functions of b, so convex: the chord is an upper bound); None beyond the last one."""
    for lo, hi in zip(runs, runs[1:]):
        if lo["batch"] <= b <= hi["batch"]:
            return lo["peak"] + (b - lo["batch"]) * (hi["peak"] - lo["peak"]) / (hi["batch"] - lo["batch"])
    return runs[0]["peak"] if b == runs[0]["batch"] else None


def max_batch(w: dict, m: dict, mode: str, gib: int) -> str:
    """The largest batch whose need fits `gib` GiB ("–": not even 1; "N+": the ladder stopped at N still fitting)."""
    runs = m["runs"][mode]
    best = 0
    for b in range(1, runs[-1]["batch"] + 1):
        if need(w, m, peak_at(runs, b)) > gib * GIB:
            break
        best = b
    if best == runs[-1]["batch"]:
        return f"{best}+"
    return str(best) if best else "–"


def modes(m: dict) -> tuple[str, ...]:
    """The measured modes of a stage (its "ckpt" runs are the "plain" ones where checkpointing does not apply)."""
    return ("plain", "ckpt") if m["ckpt_applies"] else ("plain",)


def gb(x: float, digits: int = 2) -> str:
    return f"{x / GIB:.{digits}f}"


def print_weights(rows):
    print("\nWeights, gradients and AdamW state (full preset, bf16 frozen / fp32 trainable; GB = GiB)\n")
    print("| recipe · stage | trainable params (dry-run) | trainable params allocated | frozen GB | trainable GB | "
          "grads GB | AdamW GB | total GB |")
    print("|---|---|---|---|---|---|---|---|")
    for w in rows:
        total = w["frozen_bytes"] + w["trainable_bytes"] + w["grad_bytes"] + w["adamw_bytes"]
        print(f"| {w['recipe']} · {w['stage']} | {w['table_trainable']} | {w['trainable_params']} | "
              f"{gb(w['frozen_bytes'])} | {gb(w['trainable_bytes'])} | {gb(w['grad_bytes'])} | "
              f"{gb(w['adamw_bytes'])} | {gb(total)} |")


def print_measured(measured):
    print("\nMeasured steps (bytes of tensors beyond the weights; held = alive at the forward's end; peak = forward "
          "+ backward, gradients included; per sample = batch 2 − batch 1, last = between the two largest batches)\n")
    print("| size | recipe · stage | ckpt | LLM tokens | held B=1 GB | held/sample GB | peak B=1 GB | "
          "peak/sample GB | last peak/sample GB | batches | grads GB | AdamW state GB | step temporaries GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in measured:
        for mode in modes(m):
            runs = m["runs"][mode]
            on = "no" if mode == "plain" else "yes"
            last = (runs[-1]["peak"] - runs[-2]["peak"]) / (runs[-1]["batch"] - runs[-2]["batch"])
            cells = [runs[0]["held"], linear(runs, "held")[1], runs[0]["peak"], linear(runs, "peak")[1], last]
            print(f"| {m['size']} | {m['recipe']} · {m['stage']} | {on} | {runs[0]['llm_length'] or '–'} | "
                  + " | ".join(gb(x, 3) for x in cells) + f" | {runs[0]['batch']}–{runs[-1]['batch']} | "
                  + " | ".join(gb(x, 3) for x in (runs[0]["grads"], m["state"], m["step_temporaries"])) + " |")


def print_parts(measured):
    parts = []
    for m in measured:
        for part in m["runs"]["plain"][1]["held_by_part"]:
            if part not in parts:
                parts.append(part)
    print("\nHeld for backward per sample, by part (GB; without / with checkpointing)\n")
    print("| size | recipe · stage | " + " | ".join(parts) + " |")
    print("|---|---|" + "---|" * len(parts))
    for m in measured:
        cells = []
        for part in parts:
            pair = [r[1]["held_by_part"].get(part, 0) - r[0]["held_by_part"].get(part, 0)
                    for r in (m["runs"]["plain"], m["runs"]["ckpt"])]
            cells.append("–" if not any(pair) else f"{gb(pair[0])} / {gb(pair[1])}")
        print(f"| {m['size']} | {m['recipe']} · {m['stage']} | " + " | ".join(cells) + " |")


def print_fit(weights, measured):
    w_of = {(w["recipe"], w["stage"]): w for w in weights}
    rows = [(w_of[m["recipe"], m["stage"]], m) for m in measured if m["size"] == "full"]
    if not rows:
        return
    print(f"\nFull model, 256 px: memory and the largest batch per GPU (need = {FRAGMENTATION:.2f} × (weights + "
          f"AdamW + max(peak(B), grads + step temporaries)) + {ALLOWANCE / GIB:.0f} GB; activations = held for "
          "backward; cells: without / with gradient checkpointing)\n")
    print("| recipe · stage | frozen GB | trainable GB | grads GB | AdamW GB | activations/sample GB | "
          "fixed activations GB | need at batch 1 GB | " + " | ".join(f"max batch {g} GB" for g in GPUS) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(GPUS))
    for w, m in rows:
        held = [linear(m["runs"][mode], "held") for mode in ("plain", "ckpt")]
        first = [need(w, m, m["runs"][mode][0]["peak"]) for mode in ("plain", "ckpt")]
        batches = [" / ".join(max_batch(w, m, mode, g) for mode in ("plain", "ckpt")) for g in GPUS]
        note = "" if m["ckpt_applies"] else " ¹"
        print(f"| {w['recipe']} · {w['stage']}{note} | {gb(w['frozen_bytes'])} | {gb(w['trainable_bytes'])} | "
              f"{gb(w['grad_bytes'])} | {gb(w['adamw_bytes'])} | {gb(held[0][1])} / {gb(held[1][1])} | "
              f"{gb(held[0][0])} / {gb(held[1][0])} | {gb(first[0])} / {gb(first[1])} | " + " | ".join(batches) + " |")
    if any(not m["ckpt_applies"] for _, m in rows):
        print("\n¹ set_stage turns gradient checkpointing on only for a trainable UNet or LoRA: none in this stage.")
    print("\nN+: still fits at N, the largest batch measured (--max-batch, 1024 by default).")
    for w, m in rows:
        for mode, b in m.get("oom_at", {}).items():
            print(f"{w['recipe']} · {w['stage']}: this GPU ran out of memory at batch {b} "
                  f"{'with' if mode == 'ckpt' else 'without'} checkpointing (the ladder stopped there).")


def print_target(weights, measured):
    recipe, stage, gpu, batch = TARGET
    w = next((w for w in weights if (w["recipe"], w["stage"]) == (recipe, stage)), None)
    m = next((m for m in measured if (m["size"], m["recipe"], m["stage"]) == ("full", recipe, stage)), None)
    if w is None or m is None:
        return
    best = {mode: max_batch(w, m, mode, gpu) for mode in ("plain", "ckpt")}
    at = {mode: next((r for r in m["runs"][mode] if r["batch"] == batch), None) for mode in ("plain", "ckpt")}
    met = any(r is not None and need(w, m, r["peak"]) <= gpu * GIB for r in at.values())
    print(f"\nTarget (#8): full {recipe} stage {stage} fits one {gpu} GB GPU at batch >= {batch} at 256 px: "
          f"{'MET' if met else 'NOT MET'}. Measured at batch {batch}: need "
          + ", ".join(f"{gb(need(w, m, r['peak']))} GB {'with' if mode == 'ckpt' else 'without'} checkpointing"
                      for mode, r in at.items() if r is not None)
          + f"; largest batch on {gpu} GB: {best['plain']} without, {best['ckpt']} with.")


def print_inference(rows):
    print("\nInference, full insightedit stage 3, one 256-px edit (three-branch guidance = UNet batch 3)\n")
    print("| weights as | weights GB | peak above weights GB | need GB | " + " | ".join(f"{g} GB" for g in GPUS)
          + " |")
    print("|---|---|---|---|" + "---|" * len(GPUS))
    for r in rows:
        total = FRAGMENTATION * (r["weights"] + r["peak"]) + ALLOWANCE
        fits = " | ".join("fits" if total <= g * GIB else "no" for g in GPUS)
        print(f"| {r['name']} | {gb(r['weights'])} | {gb(r['peak'])} | {gb(total)} | {fits} |")


def print_check(rows):
    print("\nCheck: toy size, fp32, batch 2, the same step computed and shape-only (bytes)\n")
    print("| recipe · stage | ckpt | held computed | held shape-only | peak computed | peak shape-only | "
          "peak difference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["computed"], r["shape_only"]
        diff = abs(a["peak"] - b["peak"]) / a["peak"]
        print(f"| {r['recipe']} · {r['stage']} | {'yes' if r['ckpt'] else 'no'} | {a['held']} | {b['held']} | "
              f"{a['peak']} | {b['peak']} | {100 * diff:.2f} % |")


def print_notes(measured):
    full = [m for m in measured if m["size"] == "full"]
    if not full:
        return
    print("\nNotes")
    kernels = sorted({k for m in full for k in m.get("attention_kernels", [])})
    maps = sum(r["attention_map_bytes"] for m in full for mode in modes(m) for r in m["runs"][mode])
    print(f"  attention kernels seen: {', '.join(kernels) or 'not recorded (CUDA)'}; attention probabilities "
          f"saved for backward: {gb(maps)} GB (all runs)")
    for m in full:
        if abs(m["weight_bytes"] - m["expected_weight_bytes"]) > 0:
            print(f"  {m['recipe']} stage {m['stage']}: the measured model's weights are {gb(m['weight_bytes'])} GB, "
                  f"the weights table's {gb(m['expected_weight_bytes'])} GB (see the mindedit note)")
    if any(m["recipe"] == "mindedit" for m in full):
        print("  mindedit is measured on the config's LLaVA road (a Llama with Qwen2-7B's sizes, a CLIP tower with "
              "SigLIP's, one 384-px view = 729 image tokens); LLaVA-OneVision's processor adds anyres tiles "
              "(a 256-px image: about 2 × 729 + 27 tokens), so its real LLM activations are about twice the "
              "mllm share in the tables above. Its weights, grads and AdamW rows are the OneVision model's.")
    print("  " + SMARTEDIT)


# ----------------------------------------------------------------------------------------------------------------
def parse_selection(text: str) -> dict:
    """"insightedit:2,ip2p" -> {"insightedit": [2], "ip2p": [2]}."""
    selection = {}
    for item in (s.strip() for s in text.split(",")):
        recipe, _, stage = item.partition(":")
        if recipe not in RECIPES:
            raise UserError(f"--recipes {text}: {item!r} — choose from {', '.join(RECIPES)} (optionally :STAGE)")
        stages = preset(recipe, "full").stages
        if stage and (not stage.isdigit() or int(stage) not in stages):
            raise UserError(f"--recipes {text}: {recipe} has stages {', '.join(map(str, stages))}")
        chosen = selection.setdefault(recipe, [])
        chosen += [s for s in ([int(stage)] if stage else stages) if s not in chosen]
    return selection


def parse_list(text: str, allowed, flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or any(s not in allowed for s in items):
        raise UserError(f"{flag} {text}: choose from {', '.join(allowed)}, comma-separated")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--recipes", default=",".join(RECIPES), help="RECIPE (all its stages) or RECIPE:STAGE, "
                   "comma-separated")
    p.add_argument("--sizes", default="full", help="sizes to measure: toy, mid, full (the GPU fit needs full)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="measure activations (--no-measure: the weights table only)")
    p.add_argument("--check", action="store_true", help="also run the toy step computed and shape-only")
    p.add_argument("--device", default="cpu", help="cpu (shape-only steps) or cuda (real steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every figure (bytes) to this file")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="the full model's batch ladder 1, 2, 4, ... "
                   "stops at this batch at the latest (a power of two)")
    p.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                   help="with full and insightedit: also measure one edit's memory (three full models)")
    args = p.parse_args(argv)
    selection = parse_selection(args.recipes)
    sizes = parse_list(args.sizes, SIZES, "--sizes")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    if args.max_batch < 2 or args.max_batch & (args.max_batch - 1):
        raise UserError(f"--max-batch {args.max_batch}: must be a power of two, at least 2")
    device = common.pick_device(args.device)
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()  # the toy tokenizer's "longer than the maximum" notices
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    print(common.machine(device))

    weights = weights_rows(selection)
    result = dict(weights=weights, measured=[], inference=[], check=[])
    if args.measure:
        for size in sizes:
            for w in weights:
                m = measure_stage(size, w, device, log, args.max_batch)
                m["expected_weight_bytes"] = w["frozen_bytes"] + w["trainable_bytes"] if size == "full" else None
                result["measured"].append(m)
        if "full" in sizes and "insightedit" in selection and args.inference:
            result["inference"] = measure_inference(device, log)
    if args.check:
        result["check"] = check_rows(selection, log)

    print_weights(weights)
    if result["measured"]:
        print_fit(weights, result["measured"])
        print_target(weights, result["measured"])
        print_measured(result["measured"])
        print_parts(result["measured"])
    if result["inference"]:
        print_inference(result["inference"])
    if result["check"]:
        print_check(result["check"])
    print_notes(result["measured"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{device.type}, torch threads {args.threads}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
