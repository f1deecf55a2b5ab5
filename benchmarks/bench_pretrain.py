"""SimCLR pretraining throughput: toolkit's on-device loop against the usual PIL + DataLoader pipeline.

Both sides train the same ``SimCLRModel`` with the same batch size, NT-Xent loss,
AdamW and number of timed steps, on the same machine in the same run:

  toolkit   ``toolkit.engine.loops.simclr_epoch`` itself: uint8 MNIST on the device, a
            per-step index slice, ``two_views`` (batched, per-image random
            parameters), forward, NT-Xent, backward, AdamW step.
  baseline  torchvision PIL transforms applied per sample inside a
            ``DataLoader`` with ``--workers`` processes (two views per image),
            batches copied to the device, then the same forward/loss/backward/step.

A step is timed whole (augmentation + forward + backward + optimizer step) in
views/s (two views per image). Augmentation alone is timed too, so the table
shows where the difference comes from.

Imports only torch, torchvision, accelerate and toolkit modules that do not
import Ray or MLflow (augment, config, data, engine, losses, models, tracking), so it runs
on a bare GPU machine. Run from the repository root:

    python benchmarks/bench_pretrain.py                      # 2-core CPU: about 2 min
    python benchmarks/bench_pretrain.py --steps 200 --bf16 --json bench.json   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Benchmark this checkout, not whatever copy of toolkit happens to be installed.
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

from toolkit.maths.augment import make_generator, two_views  # noqa: E402
from toolkit.config import AugmentConfig, ModelConfig, PretrainConfig  # noqa: E402
from toolkit.datasets.mnist import load_mnist, to_float  # noqa: E402
from toolkit.engine.loops import EpochBatches, OptimState, simclr_epoch  # noqa: E402
from toolkit.maths.losses import nt_xent_loss  # noqa: E402
from toolkit.maths.models import SimCLRModel  # noqa: E402
from toolkit.tracking.machine import device_label  # noqa: E402  (imports no MLflow)

SEED = 0


# --- the baseline pipeline ---------------------------------------------------


class AddGaussianNoise:
    """Tensor -> tensor + N(0, std^2), clamped to [0, 1] (toolkit's last augmentation step).

    A module-level class, not a lambda, so DataLoader workers can pickle it under any start method.
    """

    def __init__(self, std: float):
        self.std = std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x + torch.randn_like(x) * self.std).clamp_(0.0, 1.0)


def baseline_transform(aug: AugmentConfig) -> T.Compose:
    """The usual per-sample PIL pipeline with toolkit's default magnitudes.

    Rotation, shear, zoom and translation ranges are ``aug``'s; bilinear as in toolkit
    (torchvision's default is nearest). The elastic warp uses Simard et al.'s MNIST
    setting (alpha 34, sigma 4); its cost does not depend on the magnitudes. Erasing
    covers 1-16% of the image, as toolkit's rectangles of 10-40% per side do.
    """
    s = aug.strength
    return T.Compose([
        T.RandomAffine(
            degrees=aug.rotate_deg * s,
            translate=(aug.translate * s, aug.translate * s),
            scale=(1 + (aug.scale_min - 1) * s, 1 + (aug.scale_max - 1) * s),
            shear=aug.shear_deg * s,
            interpolation=T.InterpolationMode.BILINEAR,
        ),
        T.RandomApply([T.ElasticTransform(alpha=34.0, sigma=4.0)], p=aug.elastic_prob),
        T.RandomApply([T.GaussianBlur(3, sigma=(0.5, 1.0))], p=aug.blur_prob),
        T.ToTensor(),
        T.RandomErasing(p=aug.erase_prob * min(s, 1.0), scale=(0.01, 0.16), value=0),
        AddGaussianNoise(aug.noise_std * s),
    ])


class TwoViewMnist(torch.utils.data.Dataset):
    """uint8 images (N, 28, 28) -> two independently augmented views, each (1, 28, 28) float."""

    def __init__(self, images_u8: torch.Tensor, transform: T.Compose):
        self.images = images_u8.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images[i])  # 2-D uint8 -> mode "L"
        return self.transform(img), self.transform(img)


# --- helpers -----------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_accelerator(device_arg: str, bf16: bool):
    """A fresh single-process Accelerator (the state is a per-process singleton)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    use_cuda = {"auto": torch.cuda.is_available(), "cuda": True, "cpu": False}[device_arg]
    if use_cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=not use_cuda, mixed_precision="bf16" if bf16 else "no")


def build(model_cfg: ModelConfig, pc: PretrainConfig, accelerator):
    """Model (channels_last, as toolkit's pretraining), AdamW and a constant LR schedule."""
    torch.manual_seed(SEED)  # same initial weights for both methods
    model = SimCLRModel(model_cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    model, opt = accelerator.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return model, opt, sched


def baseline_step(model, opt, sched, v1, v2, device, temperature, accelerator) -> torch.Tensor:
    """The same step as ``simclr_epoch``'s, on views that arrive from the DataLoader."""
    x = torch.cat([v1, v2]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        z = model(x)
    z1, z2 = z.float().chunk(2)
    loss = nt_xent_loss(z1, z2, temperature, gather=True)
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    opt.step()
    sched.step()
    return loss.detach()


# --- the four measurements ---------------------------------------------------


def toolkit_augment(images: torch.Tensor, batch: int, steps: int, warmup: int, aug: AugmentConfig) -> float:
    """views/s of ``two_views`` alone on uint8 batches already on the device."""
    device = images.device
    gen = make_generator(SEED, device)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SEED)).to(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        v1, v2 = two_views(to_float(images[perm[i * batch: (i + 1) * batch]]), aug, gen)
    sync(device)
    return 2 * steps * batch / (time.perf_counter() - t0)


def toolkit_train(images, batch, steps, warmup, aug, pc, model_cfg, accelerator) -> tuple[float, float]:
    """views/s of ``simclr_epoch`` over ``steps`` batches, after an untimed epoch of ``warmup`` batches."""
    device = accelerator.device
    model, opt, sched = build(model_cfg, pc, accelerator)
    gen = make_generator(SEED, device)
    optim = OptimState(opt, sched)
    if warmup:
        simclr_epoch(model, optim, EpochBatches(images[: warmup * batch], batch, SEED, 0), aug, pc.temperature, gen,
                     accelerator)
    timed = EpochBatches(images[warmup * batch: (warmup + steps) * batch], batch, SEED, 1)
    sync(device)
    t0 = time.perf_counter()
    stats = simclr_epoch(model, optim, timed, aug, pc.temperature, gen, accelerator)
    sync(device)
    return 2 * steps * batch / (time.perf_counter() - t0), stats["loss"]


def baseline_augment(loader, batch: int, steps: int, warmup: int) -> float:
    """views/s of the DataLoader alone (workers augmenting, nothing consuming but the loop)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return 2 * steps * batch / (time.perf_counter() - t0)


def baseline_train(loader, batch, steps, warmup, pc, model_cfg, accelerator) -> tuple[float, float]:
    """views/s of DataLoader + the same training step, after ``warmup`` untimed steps."""
    device = accelerator.device
    model, opt, sched = build(model_cfg, pc, accelerator)
    model.train()
    total = torch.zeros((), device=device)
    it = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
            total.zero_()
        v1, v2 = next(it)
        total += baseline_step(model, opt, sched, v1, v2, device, pc.temperature, accelerator)
    sync(device)
    return 2 * steps * batch / (time.perf_counter() - t0), float(total) / steps


# --- driver ------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    default_root = os.environ.get("TOOLKIT_DATA_DIR") or str((REPO / ".." / "shared" / "data").resolve())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default=default_root, help="folder holding MNIST/raw")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (each gives two views)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--width", type=int, default=16, help="model.width of the SimCLR encoder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="baseline DataLoader workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of the main process (0: torch's default, one per core); "
                        "DataLoader workers always use 1")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both methods (toolkit's GPU default)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 0 or args.workers < 0 or args.threads < 0:
        p.error("need --batch-size >= 2, --steps >= 1, --warmup >= 0, --workers >= 0, --threads >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator(args.device, args.bf16)
    device = accelerator.device
    model_cfg = dataclasses.replace(ModelConfig(), width=args.width)
    model_cfg.validate()
    aug, pc = AugmentConfig(), PretrainConfig()
    batch, steps, warmup = args.batch_size, args.steps, args.warmup

    n = (warmup + steps) * batch
    if n > 60_000:
        sys.exit(f"(warmup + steps) * batch-size = {n} images: more than MNIST's 60,000")
    images = load_mnist(args.data_root, train_subset=n).train_images  # uint8 (n, 28, 28), CPU

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_label(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "batch_size": batch, "steps": steps, "warmup": warmup, "width": args.width,
        "workers": args.workers, "precision": "bf16" if args.bf16 else "fp32",
    }
    print(f"# SimCLR pretraining throughput: {meta['date']}")
    print(f"# device {meta['device']}  torch {meta['torch']}  torchvision {meta['torchvision']}  "
          f"cpus {meta['cpu_count']}  torch threads {meta['torch_threads']}  load(1m) {meta['load_avg_1m']}")
    print(f"# batch {batch} images ({2 * batch} views)  steps {steps} (+{warmup} warmup)  width {args.width}  "
          f"baseline workers {args.workers}  {meta['precision']}", flush=True)

    dev_images = images.to(device)
    res: dict[str, float] = {}
    res["toolkit_augment"] = toolkit_augment(dev_images, batch, steps, warmup, aug)
    res["toolkit_train"], res["toolkit_loss"] = toolkit_train(dev_images, batch, steps, warmup, aug, pc, model_cfg, accelerator)
    del dev_images

    loader = torch.utils.data.DataLoader(
        TwoViewMnist(images, baseline_transform(aug)),
        batch_size=batch, shuffle=True, drop_last=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(SEED),
    )
    res["baseline_augment"] = baseline_augment(loader, batch, steps, warmup)
    res["baseline_train"], res["baseline_loss"] = baseline_train(loader, batch, steps, warmup, pc, model_cfg, accelerator)
    del loader  # shuts the persistent workers down
    meta["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    rows = [
        ("augmentation only", res["toolkit_augment"], res["baseline_augment"]),
        ("full training step", res["toolkit_train"], res["baseline_train"]),
    ]
    print()
    print(f"| {'measurement':<20} | {'toolkit views/s':>15} | {'baseline views/s':>16} | {'toolkit / baseline':>18} |")
    print(f"| {'-' * 20} | {'-' * 15}:| {'-' * 16}:| {'-' * 18}:|")
    for name, a, b in rows:
        print(f"| {name:<20} | {a:>15,.0f} | {b:>16,.0f} | {a / b:>17.1f}x |")
    print(f"\nload(1m) at the end {meta['load_avg_1m_end']} on {meta['cpu_count']} cpus "
          "(others' work on the CPU slows both methods, the multi-threaded main process most)")
    print(f"mean NT-Xent over the timed steps (sanity): toolkit {res['toolkit_loss']:.3f}  baseline {res['baseline_loss']:.3f}")

    out = {"meta": meta, "views_per_s": {k: v for k, v in res.items() if not k.endswith("_loss")},
           "ratio": {"augment": res["toolkit_augment"] / res["baseline_augment"],
                     "train": res["toolkit_train"] / res["baseline_train"]},
           "loss": {"toolkit": res["toolkit_loss"], "baseline": res["baseline_loss"]}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
