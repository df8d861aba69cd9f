"""The pieces of the hand-written training loop that train.py reads top to bottom.

Randomness is keyed by the *draw*: the position of a sample in the run's stream of samples. The sampler yields
(index, draw) pairs, and everything random about that sample — its flip, its diffusion noise and timestep, the
VAE's sampling noise, the guidance-dropout coin — comes from a generator seeded by (seed, draw). Hence:
  * `torchrun` with K ranks computes exactly what one process computes with the same global batch (each rank
    takes a slice of the same global batch, and each sample carries its own random numbers);
  * `--resume` is exact: the stream continues at the saved draw, nothing depends on RNG state.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # a large odd constant: spreads (seed, draw) over the generator's seed space


def draw_generator(seed: int, draw: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + draw) % (2 ** 63))


class DrawStream(Sampler):
    """An endless, resumable stream of (index, draw) for one rank.

    Epoch e is a permutation of the dataset (or, with per-item weights, a weighted draw with replacement of the
    same length) from a generator seeded by (seed, e). Global draw g goes to rank (g // per_rank_batch) % world,
    so consecutive global batches are split into contiguous per-rank slices of the same samples.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, micro_batch: int = 1,
                 weights: list[float] | None = None, start: int = 0):
        self.n, self.seed, self.rank, self.world, self.micro = n, seed, rank, world, micro_batch
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self.start = start  # first global draw to yield (resume)

    def _epoch(self, e: int) -> torch.Tensor:
        g = draw_generator(self.seed, -1 - e)
        if self.weights is None:
            return torch.randperm(self.n, generator=g)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g)

    def __iter__(self):
        draw = self.start
        # Align to the first draw of this rank at or after `start`.
        while True:
            e, pos = divmod(draw, self.n)
            order = self._epoch(e)
            while pos < self.n:
                if (draw // self.micro) % self.world == self.rank:
                    yield int(order[pos]), draw
                draw += 1
                pos += 1

    def __len__(self):  # endless; DataLoader only needs this for its progress bookkeeping
        return 2 ** 62


class Draws(Dataset):
    """Wrap a dataset: item (index, draw) -> the sample plus its own random numbers (see the module docstring)."""

    def __init__(self, dataset, seed: int, latent_shape: tuple | None, train_timesteps: int):
        self.dataset, self.seed, self.latent_shape, self.T = dataset, seed, latent_shape, train_timesteps

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, draw = key
        g = draw_generator(self.seed, draw)
        item = dict(self.dataset[index, draw // len(self.dataset)], draw=draw)
        if self.latent_shape is not None:
            item["noise"] = torch.randn(self.latent_shape, generator=g)
            item["vae_eps"] = torch.randn(self.latent_shape, generator=g)
            item["t"] = torch.randint(0, self.T, (), generator=g)
            item["u"] = torch.rand((), generator=g)
            item["u_t2i"] = torch.rand((), generator=g)  # drawn last: the draws above stay what they were
        return item


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters, in the model's order: no weight decay on biases and norms
    (ndim < 2) nor on the matrices the model names (`model.no_decay_parameters()`: embeddings incl. the [MM] row
    matrices, learned queries)."""
    flat_ids = {id(p) for p in model.no_decay_parameters()}
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.ndim < 2 or id(p) in flat_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to the base rate, then cosine decay to zero."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EMA:
    """Exponential moving average of the trained weights, for sampling and for the next stage (the diffusers
    InstructPix2Pix example's `--use_ema`; a standard win for small diffusion models).

    shadow ← d·shadow + (1 − d)·θ after every optimizer step, with d = min(decay, (1 + k) / (10 + k)) at update k,
    so the average does not stay stuck near the random initialisation in a short run. The shadow is float32.
    `applied()` swaps it into the model for a checkpoint or a sample grid and swaps the trained values back.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach().float() for p in self.params.values()], 1 - d)

    @contextmanager
    def applied(self):
        trained = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])

    def state(self) -> dict:
        """For --resume: the shadow and the trained values (the checkpoint's weights hold the shadow)."""
        return {"shadow": dict(self.shadow), "trained": {n: p.detach() for n, p in self.params.items()}}

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        for n, p in self.params.items():
            self.shadow[n].copy_(state["shadow"][n])
            p.copy_(state["trained"][n])


# What a changed field means when a run is resumed with it (the architecture cannot change: check_compatible).
_BOOKKEEPING = {"save_every", "sample_every", "log_every", "num_workers", "nan_patience", "max_bad_fraction",
                "steps", "text_guidance", "image_guidance", "ip_scale", "scheduler"}


def resume_changes(saved, current, step: int) -> list[str]:
    """One line per config field that differs between the checkpoint and this --resume, saying what it does."""
    from .config import diff_keys

    lines = []
    for k in diff_keys(saved, current):
        old, new = getattr(saved, k), getattr(current, k)
        if k in ("max_steps", "warmup_ratio", "lr"):
            rates = [c.lr * lr_lambda(max(1, round(c.warmup_ratio * c.max_steps)), c.max_steps)(step)
                     for c in (saved, current)]
            why = (f"the learning-rate schedule is recomputed: at step {step} the rate is {rates[1]:.3g} instead of "
                   f"{rates[0]:.3g}")
        elif k in ("batch_size", "grad_accum"):
            why = "a different effective batch: the data stream continues, but not as an uninterrupted run would"
        elif k == "seed":
            why = "different data order and noise from here on"
        elif k in _BOOKKEEPING:
            why = "bookkeeping or sampling only: the weights are trained as before"
        else:
            why = "applies from the resumed step on: the run is no longer what an uninterrupted run would give"
        lines.append(f"{k}: {old!r} in the checkpoint, {new!r} now — {why}")
    return lines
