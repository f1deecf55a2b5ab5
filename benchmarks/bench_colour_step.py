"""SimCLR step throughput by image shape: MNIST's 1x28x28 against CIFAR-10's 3x32x32, in one run.

The same ``simclr_epoch`` (on-device uint8 images, ``two_views``, forward, NT-Xent, backward,
AdamW) on random uint8 images of each shape, the cpu profile's network (width 16, depth 3,
pool 2) and batch; views/s of each and their ratio. Random pixels time the same arithmetic as
real ones. Run from the repository root:

    python benchmarks/bench_colour_step.py            # 2-core CPU: about 1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from toolkit.config import AugmentConfig, ModelConfig  # noqa: E402
from toolkit.datasets.spec import ImageSpec  # noqa: E402
from toolkit.engine.loops import EpochBatches, OptimState, simclr_epoch  # noqa: E402
from toolkit.maths.augment import make_generator  # noqa: E402
from toolkit.maths.models import SimCLRModel  # noqa: E402

SHAPES = {"mnist 1x28x28": ImageSpec(1, 28, 10), "cifar 3x32x32": ImageSpec(3, 32, 10, (0.49, 0.48, 0.45),
                                                                             (0.25, 0.24, 0.26))}


def views_per_s(spec: ImageSpec, batch: int, steps: int, width: int) -> float:
    torch.manual_seed(0)
    model = SimCLRModel(ModelConfig(width=width), spec).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    images = torch.randint(0, 256, (batch * (steps + 1), *spec.input_shape()), dtype=torch.uint8)

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # what a CPU worker uses (engine.workers.make_accelerator)

    def run(n_steps: int, epoch: int) -> float:
        batches = EpochBatches(images[: batch * n_steps], batch, seed=0, epoch=epoch)
        t0 = time.perf_counter()
        simclr_epoch(model, OptimState(opt, sched), batches, AugmentConfig(), 0.2, make_generator(epoch, "cpu"), accelerator)
        return 2 * batch * n_steps / (time.perf_counter() - t0)

    run(1, 0)  # warm-up
    return run(steps, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = {name: views_per_s(spec, args.batch, args.steps, args.width) for name, spec in SHAPES.items()}
    first, second = out.values()
    for name, v in out.items():
        print(f"{name}: {v:,.0f} views/s")
    print(f"colour / mnist: {second / first:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "ratio": second / first, **vars(args)}, indent=1))


if __name__ == "__main__":
    main()
