"""LoRA for ``nn.Linear``: low-rank adapters injected by module name (Hu et al. 2021, used by SmartEdit §3.2 and
InsightEdit §4.1 to adapt the frozen LLaVA decoder).

A frozen linear layer ``y = x Wᵀ + b`` gets a trainable low-rank update:

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ,      A: r×in,  B: out×r

A is Kaiming-uniform (a = √5, as ``nn.Linear`` and peft), B is zero, so a freshly injected LoRA is an exact no-op.

Choices recorded here:
- ``LoRALinear`` *is* an ``nn.Linear`` that takes over the base layer's own ``weight``/``bias`` tensors (no copy,
  no nesting), so a layer formerly at ``x.q_proj`` still has ``x.q_proj.weight``/``x.q_proj.bias`` and base
  checkpoints load unchanged; the adapter adds only ``x.q_proj.lora_A`` and ``x.q_proj.lora_B``.
- A and B live on the base weight's device (``meta`` included: a meta model gets meta adapters, for counting
  parameters without memory) in ``dtype`` (default: the base weight's dtype). The project keeps trainable
  parameters in fp32 over a bf16 base, so the LoRA path runs in the adapter dtype and is cast back to the dtype of
  the base output.
- ``merge()`` folds the update into W for inference; forward on a merged layer is the plain linear, so no gradient
  reaches A/B: merge for inference only. Merging twice (or unmerging an unmerged layer) is an error, never a
  double add. Merging into a bf16 weight rounds; unmerge then restores W only up to that rounding.
- ``inject_lora`` neither freezes nor unfreezes the base: the training set-up decides what trains. The defaults
  (rank 16, alpha 27 on q/v) follow the SmartEdit paper; its public code used rank 8, alpha 16.
"""

import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank adapter; built from (and sharing the tensors of) an existing layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # On meta tensors these init calls do nothing, which is what a memory-free build wants.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update scaling · B A (out×in), in the adapter dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        if self.merged:
            return result
        # (..., in) -> (..., r) -> (..., out), computed in the adapter dtype
        z = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(z, self.lora_A), self.lora_B) * self.scaling
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LoRA layer is already merged; merging again would add the update twice")
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged; nothing to unmerge")
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def inject_lora(model: nn.Module, targets=("q_proj", "v_proj"), rank: int = 16, alpha: float = 27,
                dropout: float = 0.0, include: str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets`` (and whose full dotted name matches
    the regex ``include`` with ``re.search``, if given) by a ``LoRALinear``. Returns the replaced names.

    Call before building the optimizer, DDP or ``torch.compile``. Raises if a matching layer already carries LoRA
    or if nothing matched (a misspelt target should not silently train nothing)."""
    targets = {targets} if isinstance(targets, str) else set(targets)
    pattern = re.compile(include) if include is not None else None
    replaced = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in targets or (pattern is not None and not pattern.search(name)):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name!r} already has LoRA; inject_lora must be called once per model")
        if not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout, dtype))
        replaced.append(name)
    if not replaced:
        raise ValueError(f"inject_lora: no nn.Linear named {sorted(targets)} matched (include={include!r})")
    return replaced


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The A and B parameters of every LoRA layer in ``model``."""
    for _, layer in _lora_layers(model):
        yield layer.lora_A
        yield layer.lora_B


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``{"<layer>.lora_A": r×in, "<layer>.lora_B": out×r}`` with full dotted names."""
    sd = {}
    for name, layer in _lora_layers(model):
        sd[f"{name}.lora_A"] = layer.lora_A.detach().clone()
        sd[f"{name}.lora_B"] = layer.lora_B.detach().clone()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapters saved by ``lora_state_dict`` into an injected model; the key sets must match exactly."""
    params = {}
    for name, layer in _lora_layers(model):
        if layer.merged:
            raise RuntimeError(f"{name!r} is merged; unmerge before loading LoRA weights")
        params[f"{name}.lora_A"], params[f"{name}.lora_B"] = layer.lora_A, layer.lora_B
    missing, unexpected = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
    if missing or unexpected:
        raise UserError(f"LoRA state dict does not match the model: missing keys {missing}, unexpected keys "
                        f"{unexpected} — inject LoRA with the same targets/include as the run that saved it")
    for key, param in params.items():
        if sd[key].shape != param.shape:
            raise UserError(f"LoRA weight {key!r}: checkpoint shape {tuple(sd[key].shape)} != model shape "
                            f"{tuple(param.shape)} — the checkpoint used another rank or base model")
        param.copy_(sd[key])


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference only)."""
    for _, layer in _lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for _, layer in _lora_layers(model):
        layer.unmerge()
