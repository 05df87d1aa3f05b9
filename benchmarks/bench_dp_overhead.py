"""DP-SGD overhead per training step on this CPU, per Opacus grad-sample mode.

    python benchmarks/bench_dp_overhead.py [--reps 15] [--threads 0] [--out benchmarks/results]
    # the built-in federation's models and its mutual-learning step, at its input size and batch:
    python benchmarks/bench_dp_overhead.py --models scatter-linear scatter-cnn scatter-mlp --joint built-in \
        --image-size 14 --batch 256 --out benchmarks/results/dp_overhead_builtin

Workloads (Fashion-MNIST-shaped synthetic input, 1x28x28 unless --image-size, batch 64 unless
--batch): single models ``cnn-small`` (GroupNorm CNN), ``mlp``, ``resnet-gn`` and the joint
mutual-learning step of 2, 3 and 4 models (``JointModel`` + DFML loss, the
aggregator's step), or the ones named by --models / --joint.  For each workload and grad-sample mode (hooks,
functorch, ew, ghost):

* correctness: the clipped per-sample gradient sum that the mode produces on
  a batch of 8 (clip norm 0.05, so every sample is clipped) must match a
  per-sample loop reference (relative error <= 1e-3);
* time per step: non-private SGD step (zero_grad, forward, loss, backward,
  step) vs. the DP-SGD step of ``secure_dfml.privacy.DPSGDSession`` (per-sample
  gradients or norms, clipping, Gaussian noise, step) on the same batch and
  identical model copies.  Variants run round-robin (rotating order).  The
  primary measure is the process CPU time per step with one torch thread
  (``--threads 1``, default), which other processes sharing the machine do
  not inflate; wall-clock times are recorded too.  The reported ratio is the
  median of per-repetition ratios DP / non-private.

The fastest correct mode per workload is what ``grad_sample_mode = "auto"``
should pick; the table says whether it does.  Writes dp_overhead.json and
dp_overhead.md to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import opacus
import torch
import torch.nn.functional as F
from torch import nn

from secure_dfml.config import BUILT_IN_MIX
from secure_dfml.models import build_model
from secure_dfml.privacy import (
    GRAD_SAMPLE_MODES,
    DPSGDSession,
    auto_grad_sample_mode,
    clipped_sum_gradient,
    reference_clipped_sum,
)
from secure_dfml.protocol.losses import JointModel, mutual_learning_loss

SHAPE = (1, 28, 28)
CLASSES = 10
SINGLE = ("cnn-small", "mlp", "resnet-gn")
JOINT = {
    "2": ("cnn-small", "mlp"),
    "3": ("cnn-small", "mlp", "resnet-gn"),
    "4": ("cnn-small", "mlp", "resnet-gn", "cnn-wide"),
    "built-in": BUILT_IN_MIX,  # the mutual-learning step of `secure-dfml run`
}
TOLERANCE = 1e-3

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make(arch: str, seed: int) -> nn.Module:
    return build_model(arch, input_shape=SHAPE, num_classes=CLASSES, kind="image", generator=torch.Generator().manual_seed(seed))


def _set_image_size(size: int) -> None:
    global SHAPE
    SHAPE = (1, size, size)


def joint_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return mutual_learning_loss(
        list(out.unbind(0)), y, alpha=0.5, temperature=2.0, class_prior=torch.full((CLASSES,), 1.0 / CLASSES)
    )


def rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, ref, strict=True))


def workload(name: str, module: nn.Module, loss_fn: LossFn, batch_dim: int, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(args.batch, *SHAPE, generator=gen)
    y = torch.randint(0, CLASSES, (args.batch,), generator=gen)
    xs, ys = x[:8], y[:8]

    result: dict = {"name": name, "params": sum(p.numel() for p in module.parameters()), "modes": {}}
    ref = reference_clipped_sum(copy.deepcopy(module), x=xs, y=ys, loss_fn=loss_fn, batch_dim=batch_dim, max_grad_norm=0.05)
    for mode in GRAD_SAMPLE_MODES:
        try:
            got = clipped_sum_gradient(
                copy.deepcopy(module), x=xs, y=ys, loss_fn=loss_fn, batch_dim=batch_dim, max_grad_norm=0.05, mode=mode
            )
            err = rel_error(got, ref)
            result["modes"][mode] = {"correct": err <= TOLERANCE, "max_rel_error": err}
        except Exception as exc:  # a mode that cannot run this model is reported, not fatal
            result["modes"][mode] = {"correct": False, "error": f"{type(exc).__name__}: {exc}"[:200]}

    # identical copies, one per variant
    plain_model = copy.deepcopy(module)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain_model(x), y).backward()
        plain_opt.step()

    steps: dict[str, Callable[[], None]] = {"plain": plain_step}
    sessions: list[DPSGDSession] = []
    for mode, info in result["modes"].items():
        if "error" in info:
            continue
        m = copy.deepcopy(module)
        session = DPSGDSession(
            m,
            torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
            loss_fn=loss_fn,
            batch_dim=batch_dim,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=args.batch,
            mode=mode,
            noise_generator=torch.Generator().manual_seed(7),
        )
        sessions.append(session)
        steps[mode] = lambda s=session: s.step(x, y)

    names = list(steps)
    cpu: dict[str, list[float]] = {k: [] for k in names}
    wall: dict[str, list[float]] = {k: [] for k in names}
    try:
        for rep in range(args.warmup + args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for k in order:
                w0, c0 = time.perf_counter(), time.process_time()
                steps[k]()
                c1, w1 = time.process_time(), time.perf_counter()
                if rep >= args.warmup:
                    cpu[k].append(c1 - c0)
                    wall[k].append(w1 - w0)
    finally:
        for s in sessions:
            s.close()

    plain = cpu["plain"]
    result["plain_ms"] = statistics.median(plain) * 1e3
    result["plain_wall_ms"] = statistics.median(wall["plain"]) * 1e3
    for mode, info in result["modes"].items():
        if mode not in cpu:
            continue
        info["ms"] = statistics.median(cpu[mode]) * 1e3
        info["wall_ms"] = statistics.median(wall[mode]) * 1e3
        info["ratio"] = statistics.median(d / p for d, p in zip(cpu[mode], plain, strict=True))
        info["wall_ratio"] = statistics.median(d / p for d, p in zip(wall[mode], wall["plain"], strict=True))
    correct = {m: i for m, i in result["modes"].items() if i.get("correct") and "ratio" in i}
    fastest = min(correct, key=lambda m: correct[m]["ratio"]) if correct else None
    auto = auto_grad_sample_mode(module)
    result.update(
        fastest_correct=fastest,
        fastest_ratio=None if fastest is None else correct[fastest]["ratio"],
        auto_mode=auto,
        auto_ratio=result["modes"].get(auto, {}).get("ratio"),
        auto_is_fastest=auto == fastest,
    )
    print(
        f"{name:<28} plain {result['plain_ms']:7.2f} ms  "
        + "  ".join(
            f"{m} {i['ratio']:.2f}x{'' if i['correct'] else '(wrong)'}" for m, i in result["modes"].items() if "ratio" in i
        )
        + f"  -> fastest {fastest}, auto {auto}",
        flush=True,
    )
    return result


def markdown(report: dict) -> str:
    modes = list(GRAD_SAMPLE_MODES)
    lines = [
        "# DP-SGD overhead per step (CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}, {report['cpu_count']} cores, torch {report['torch']} "
        f"({report['torch_threads']} threads), Opacus {report['opacus']}; load average "
        f"{report['load_average_start']} -> {report['load_average_end']} (background load shared the CPU).  ",
        f"Input {'x'.join(map(str, report['input_shape']))}, batch {report['batch']}, {report['reps']} timed repetitions per variant (median). "
        "Times are process CPU time per step (robust to other processes on the machine; wall-clock in the JSON); "
        "ratio = median over repetitions of DP step time / non-private step time. "
        "'wrong' = clipped per-sample gradient sum differs from the per-sample loop reference.",
        "",
        "| workload | params | non-private ms | " + " | ".join(modes) + " | fastest correct | auto picks |",
        "|---|---:|---:|" + "---:|" * len(modes) + "---|---|",
    ]
    for w in report["workloads"]:
        cells = []
        for m in modes:
            i = w["modes"].get(m, {})
            if "ratio" not in i:
                cells.append("n/a")
            else:
                cells.append(f"{i['ms']:.1f} ms ({i['ratio']:.2f}x){'' if i['correct'] else ' wrong'}")
        fastest = w["fastest_correct"]
        fr = f"{fastest} ({w['fastest_ratio']:.2f}x)" if fastest else "none"
        auto = f"{w['auto_mode']}" + (" (fastest)" if w["auto_is_fastest"] else f" ({w['auto_ratio']:.2f}x)")
        lines.append(f"| {w['name']} | {w['params']:,} | {w['plain_ms']:.1f} | " + " | ".join(cells) + f" | {fr} | {auto} |")
    lines += ["", f"Target: at most {report['target_ratio']}x.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--models", nargs="*", default=list(SINGLE))
    parser.add_argument("--joint", nargs="*", choices=sorted(JOINT), default=["2", "3", "4"])
    parser.add_argument("--image-size", type=int, default=28, help="square greyscale inputs (the built-in data is 14)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _set_image_size(args.image_size)

    report: dict = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()} {platform.system()}",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "opacus": opacus.__version__,
        "batch": args.batch,
        "input_shape": list(SHAPE),
        "reps": args.reps,
        "target_ratio": 2.0,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "workloads": [],
    }
    t_start = time.perf_counter()
    for i, arch in enumerate(args.models):
        report["workloads"].append(workload(arch, make(arch, i), F.cross_entropy, 0, args))
    for m in args.joint:
        archs = JOINT[m]
        joint = JointModel([make(a, 10 + j) for j, a in enumerate(archs)])
        report["workloads"].append(workload(f"joint {m}: " + "+".join(archs), joint, joint_loss, 1, args))
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "dp_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
