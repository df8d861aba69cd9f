"""Device, precision and distributed set-up, in one place (nothing else in the package names `cuda`).

One process = one device. Under `torchrun` the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)
says so and we join the process group: nccl on CUDA, gloo on CPU (which is how DDP is tested here). Multi-node
needs nothing beyond torchrun's own flags.

Precision (DESIGN §7): frozen parts are stored in `frozen_dtype`, trainable parts in fp32, and the forward runs
under one autocast context; fp16 is only allowed on CUDA, with a GradScaler.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def frozen_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def autocast(self):
        """The one autocast context of the forward pass (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler of fp16 (CUDA only). In bf16/fp32 it is disabled, and a disabled GradScaler is a
        no-op: scale() returns the loss, unscale_()/update() do nothing, step() is optimizer.step(). So the
        training step is written once, for every precision."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def barrier(self):
        if self.distributed:
            dist.barrier()


def pick_device(name: str | None = None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", "mps", "xpu") or the best available: CUDA, then CPU. A name torch does not
    parse, a device type that cannot run a model (meta, ...), or one that is not present is a UserError."""
    if name:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {name}: not a device name — use cpu, cuda, cuda:N, mps or xpu") from None
        if dev.type not in ("cpu", "cuda", "mps", "xpu"):
            raise UserError(f"--device {name}: minedit runs on cpu, cuda, mps or xpu — choose one of those")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is visible — use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}) — choose one of those")
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if dev.type in ("mps", "xpu") and not (backend is not None and backend.is_available()):
            raise UserError(f"--device {name}: this torch build has no usable {dev.type} device — use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(precision: str = "fp32", device: str | None = None) -> Runtime:
    """Join the process group if launched by torchrun, pick this rank's device, check the precision."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if precision not in DTYPES:
        raise UserError(f"--precision={precision}: choose bf16, fp16 or fp32")
    if precision == "fp16" and dev.type != "cuda":
        raise UserError("--precision=fp16 needs CUDA (it relies on a GradScaler) — use bf16 or fp32 on the CPU")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return Runtime(device=dev, precision=precision, rank=rank, local_rank=local, world_size=world)


def shutdown(rt: Runtime) -> None:
    """Every rank waits for the others, then the process group is torn down."""
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
