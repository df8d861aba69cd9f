"""train.py reads top to bottom (issue 16): main() as named phases, a short loop, short functions, the run-folder
plumbing in its own module, and one precision path — the disabled GradScaler of bf16/fp32 changes nothing."""
import ast
from pathlib import Path

import torch

from minedit import runtime

ROOT = Path(__file__).resolve().parents[1]


def lengths(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_main_is_short_phases_around_a_short_loop():
    tree = ast.parse((ROOT / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 80
    loops = [n for n in ast.walk(main) if isinstance(n, ast.While)]
    assert len(loops) == 1 and loops[0].end_lineno - loops[0].lineno + 1 <= 35
    assert not [n for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n is not main]  # no closures
    source = ast.get_source_segment((ROOT / "train.py").read_text(), main)
    assert source.count("# ---- ") >= 4  # the phases are named


def test_functions_short_and_plumbing_in_its_own_module():
    for path in (ROOT / "train.py", ROOT / "minedit" / "runfolder.py"):
        long = {name: n for name, n in lengths(path).items() if n > 80}
        assert not long, f"{path.name}: {long}"
    assert len((ROOT / "minedit" / "runfolder.py").read_text().splitlines()) <= 300
    assert "scaler is not None" not in (ROOT / "train.py").read_text()


def test_disabled_grad_scaler_steps_exactly_like_the_plain_optimizer():
    """bf16/fp32 go through rt.grad_scaler() too: scale, unscale_, step and update must leave the weights, the
    gradients and the optimizer state bit-identical to backward() + optimizer.step()."""
    for precision in ("fp32", "bf16"):
        scaler = runtime.Runtime(torch.device("cpu"), precision).grad_scaler()
        assert not scaler.is_enabled() and scaler.state_dict() == {}
        results = []
        for through_scaler in (False, True):
            torch.manual_seed(0)
            net = torch.nn.Linear(5, 3)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
            for _ in range(3):
                loss = net(torch.randn(4, 5)).square().mean()
                if through_scaler:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)
            results.append([p.detach().clone() for p in net.parameters()]
                           + [v for s in opt.state.values() for v in s.values()])
        assert all(torch.equal(a, b) for a, b in zip(*results))
    assert runtime.Runtime(torch.device("cpu"), "fp16").grad_scaler().is_enabled()
