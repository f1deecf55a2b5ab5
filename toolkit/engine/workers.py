"""The per-worker training functions: SimCLR pretraining and classifier training.

Each runs unchanged on a Ray Train worker or in-process; the ``Session`` hides the
difference. Everything a worker needs arrives in its ``TrainJob`` (config, split,
start weights); it reads no path but the MNIST root every node has. Accelerate owns
device placement, DDP wrapping and bf16 autocast. Rank 0 alone hands checkpoints
back and prints progress; metrics reach MLflow from the driver's node (backends).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from toolkit.engine import checkpoints
from toolkit.maths.augment import make_generator
from toolkit.config import ConfigError
from toolkit.datasets.checks import DataError
from toolkit.datasets.streamed import take
from toolkit.datasets.training_data import ImageData, load_image_data
from toolkit.engine.loops import EpochBatches, MixedBatches, OptimState, classifier_steps, evaluate, simclr_epoch
from toolkit.engine.consistency_loop import ConsistencyState, consistency_steps
from toolkit.engine.jobs import TrainJob
from toolkit.maths.models import Classifier, SimCLRModel
from toolkit.maths.schedules import threshold_at, warmup_cosine_lambda


def make_accelerator(job: TrainJob):
    """An ``Accelerator`` for this process: bf16 on GPU; on CPU ``cpu=True`` so it joins the gloo group.

    A plain ``Accelerator()`` on CPU silently trains each worker alone (caught by
    ``tests/test_train_ray.py::test_two_cpu_workers_are_real_ddp``), and
    ``AcceleratorState`` is a per-process singleton, so it is reset first.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    want_gpu = job.device == "cuda" or (job.device == "auto" and torch.cuda.is_available())
    if job.threads:
        torch.set_num_threads(job.threads)
    return Accelerator(cpu=not want_gpu, mixed_precision="bf16" if want_gpu else "no")


class Progress:
    """One line per report on rank 0: what, where, how fast, time left."""

    def __init__(self, label: str, total: int, unit: str, rank: int, start: int = 0):
        """``start``: units already done when timing begins (a resumed run), so the rate counts only new ones."""
        self.label, self.total, self.unit, self.rank = label, total, unit, rank
        self.t0 = time.perf_counter()
        self.start_done = start

    def __call__(self, done: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0
        eta = (self.total - done) / rate if rate > 0 else 0
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        # sys.stdout.write, not print: Ray Train patches print into a logger that echoes each line twice
        sys.stdout.write(f"[{self.label}] {self.unit} {done}/{self.total}  {shown}  elapsed {elapsed:.0f}s  eta {eta:.0f}s\n")
        sys.stdout.flush()


def _load_images(job: TrainJob) -> ImageData:
    """The job's images: those it carries (a user's dataset, through Ray's object store on a cluster), else a
    benchmark read from this node's own copy (the same absolute path on every node of a cluster)."""
    import socket

    if job.images is not None:
        if isinstance(job.images, ImageData):
            return job.images
        import ray

        return ray.get(job.images)
    try:
        return load_image_data(job.data, job.data_root, resident_bytes=job.resident_bytes)
    except DataError as e:
        raise DataError(f"on node {socket.gethostname()}: {e} (every node needs its own copy of the benchmark at "
                        "the driver's data root: see ray_cluster.yaml's setup)") from None


def _maybe_sync_bn(job: TrainJob, model: torch.nn.Module, world: int) -> torch.nn.Module:
    if job.model.sync_bn and world > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _say(session, line: str) -> None:
    """A line on rank 0's console."""
    if session.rank == 0:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _resume(session, accelerator, model, opt: OptimState, counter: str, label: str):
    """Load the session's newest checkpoint (if any) into the model, optimizer and schedule, then hand model
    and optimizer to Accelerate. Returns (the checkpoint's ``counter``, 0 when starting fresh; the prepared
    model; its ``OptimState``).

    Written once for both workers: the checkpoint holds the unwrapped model's keys, so it is loaded
    before ``prepare`` wraps the model, and rank 0 alone says where a resumed run picks up, or that
    it starts over because no checkpoint could be read.
    """
    done = 0
    state = session.restore()
    # every checkpoint damaged (each named in a warning): starting over must not look like a resume or a fresh run
    damaged = session.unreadable() if state is None else 0
    if damaged:
        _say(session, f"[{label}] none of the {damaged} checkpoints in {session.root} could be read: "
                      f"training starts over from {counter} 0")
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.scheduler.load_state_dict(state["scheduler"])
        done = int(state[counter])
        _say(session, f"[{label}] resuming {'after epoch' if counter == 'epoch' else 'at step'} {done}")
    model, optimizer = accelerator.prepare(model, opt.optimizer)
    return done, model, OptimState(optimizer, opt.scheduler)


def simclr_worker(job: TrainJob, session) -> None:
    """SimCLR pretraining: NT-Xent over two on-device views, negatives gathered across ranks."""
    accelerator = make_accelerator(job)
    device = accelerator.device
    rank, world = session.rank, session.world
    pc = job.pretrain

    data = _load_images(job)
    # SimCLR sees the labeled and pool images without labels; the validation images stay untouched
    train_idx = torch.cat([job.split.labeled, job.split.pool])
    if pc.max_images:
        train_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(job.model.seed))[: pc.max_images]]
    images = take(data.train_images, train_idx).to(device)  # streamed images stay unread until a batch needs them

    local_batch = max(1, pc.batch_size // world)
    global_batch = local_batch * world
    steps_per_epoch = images.shape[0] // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"pretrain.batch_size={pc.batch_size} is larger than the {images.shape[0]} training images")
    total_steps = pc.epochs * steps_per_epoch

    torch.manual_seed(job.model.seed)  # identical initial weights on every rank
    model = _maybe_sync_bn(job, SimCLRModel(job.model, data.spec), world).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_lambda(total_steps, int(pc.warmup_epochs * steps_per_epoch), 0.0)
    )
    start_epoch, model, opt = _resume(session, accelerator, model, OptimState(optimizer, scheduler), "epoch",
                                      "pretrain")

    progress = Progress("pretrain", pc.epochs, "epoch", rank, start_epoch)
    for epoch in range(start_epoch, pc.epochs):
        gen = make_generator(job.model.seed * 1000 + epoch * 16 + rank, device)
        batches = EpochBatches(images, global_batch, job.model.seed, epoch, rank, world)
        stats = simclr_epoch(model, opt, batches, job.augment, pc.temperature, gen, accelerator)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"pretrain loss became {stats['loss']} in epoch {epoch + 1}: lower pretrain.lr")
        metrics = {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "lr": scheduler.get_last_lr()[0],
            "views_per_s": stats["views_per_s"],
            "epoch_seconds": stats["epoch_seconds"],
            "world_size": world,
            "global_batch": global_batch,
        }
        payload = None
        if rank == 0:
            payload = checkpoints.model_payload(
                "simclr", job.sections(), accelerator.unwrap_model(model).state_dict(),
                optimizer=opt.optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch + 1,
            )
        session.report(metrics, payload)
        progress(epoch + 1, {k: metrics[k] for k in ("loss", "lr", "views_per_s")})


def _classifier_init(job: TrainJob, model: Classifier) -> bool:
    """Warm start from a classifier, or the encoder of a SimCLR model. Returns True if the encoder is pretrained."""
    if job.init_kind == "classifier":
        model.load_state_dict(job.init_state)
        return job.encoder_pretrained
    if job.init_kind == "simclr":
        enc = {k[len("encoder."):]: v for k, v in job.init_state.items() if k.startswith("encoder.")}
        model.encoder.load_state_dict(enc)
        return True
    return False


def classifier_worker(job: TrainJob, session) -> None:
    """Classifier on the true labels (+ the job's pseudo-labels); the model is the last step's weights.

    The validation split is evaluated at every ``eval_every`` and logged, but it decides
    nothing here: the learning rate anneals to zero, and keeping the last weights (not the
    best-on-validation ones) keeps the whole training chain free of validation labels, which
    is what the strict 100-label protocol requires (the standard protocol uses them only to
    choose among finished models).
    """
    accelerator = make_accelerator(job)
    device = accelerator.device
    rank, world = session.rank, session.world
    cc = job.classifier
    steps = job.steps or cc.steps
    label = job.label or "classifier"

    data = _load_images(job).to(device)
    lab = job.split.labeled.to(device)
    labeled_x, labeled_y = data.train_images[lab], data.train_labels[lab]
    val = job.split.val.to(device)
    val_x, val_y = data.train_images[val], data.train_labels[val]
    pseudo_x = pseudo_y = None
    if len(job.pseudo_indices):
        pseudo_x = take(data.train_images, job.pseudo_indices)
        pseudo_y = job.pseudo_labels.to(device)

    torch.manual_seed(job.model.seed)
    model = Classifier(job.model, data.spec)
    pretrained = _classifier_init(job, model)
    model = _maybe_sync_bn(job, model, world).to(memory_format=torch.channels_last)
    enc_params = list(model.encoder.parameters())
    enc_ids = {id(p) for p in enc_params}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids]
    # the slower encoder rate guards SimCLR features against overfitting to the 100 labels; once
    # pseudo-labels cover the pool it only slows learning, so rounds with pseudo-labels use the full rate
    enc_lr = cc.lr * (cc.encoder_lr_scale if pretrained and pseudo_x is None else 1.0)
    optimizer = torch.optim.AdamW(
        [{"params": enc_params, "lr": enc_lr}, {"params": head_params, "lr": cc.lr}], weight_decay=cc.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(steps, min(cc.warmup_steps, steps // 2), 0.0))

    done, model, opt = _resume(session, accelerator, model, OptimState(optimizer, scheduler), "step", label)

    local_batch = max(1, cc.batch_size // world)
    progress = Progress(label, steps, "step", rank, done)
    online = _consistency_setup(job, data, accelerator.unwrap_model(model), labeled_y)
    while done < steps:
        chunk = min(cc.eval_every, steps - done)
        gen = make_generator(job.model.seed * 1_000_003 + done * 16 + rank, device)
        batches = MixedBatches(labeled_x, labeled_y, pseudo_x, pseudo_y, chunk, local_batch,
                               job.labeled_fraction)
        if online is None:
            stats = classifier_steps(model, opt, batches, job.augment, gen, accelerator, cc.label_smoothing)
        else:
            con = job.consistency
            chunks = -(-steps // cc.eval_every)
            online.update(step=done, threshold=threshold_at(done // cc.eval_every, con.schedule, con.threshold_start,
                                                            con.threshold_floor, chunks, con.rate))
            stats = consistency_steps(model, opt, batches, online["pool"], online, gen, accelerator)
        done += chunk
        plain = accelerator.unwrap_model(model)
        val_stats = evaluate(plain, val_x, val_y)  # logged; never used to pick weights
        metrics = {
            "step": done,
            "train_loss": stats["train_loss"],
            "train_acc": stats["train_acc"],
            "val_acc": val_stats["acc"],
            "val_loss": val_stats["loss"],
            "lr": scheduler.get_last_lr()[-1],
            "images_per_s": stats["images_per_s"] * world,
            **{k: stats[k] for k in ("unlabeled_loss", "mask_rate") if k in stats},
            **({"consistency_threshold": online["threshold"]} if online is not None else {}),
        }
        payload = None
        if rank == 0:
            payload = checkpoints.model_payload(
                "classifier", job.sections(), plain.state_dict(),
                optimizer=opt.optimizer.state_dict(), scheduler=scheduler.state_dict(), step=done,
                val_acc=val_stats["acc"], encoder_pretrained=pretrained, val_size=int(val_y.numel()),
            )
        session.report(metrics, payload)
        progress(done, {k: metrics[k] for k in ("train_loss", "val_acc", "images_per_s")})


def _consistency_setup(job: TrainJob, data: ImageData, plain: torch.nn.Module, labeled_y: torch.Tensor) -> dict | None:
    """What ``consistency_steps`` needs across chunks (the EMA teacher starts from the model as it is now,
    resumed or fresh), or None when ``consistency.weight`` is 0. The pool is read where it lies (streamed or
    resident); its labels, where a benchmark has them, are never read."""
    if job.consistency is None or job.consistency.weight == 0:
        return None
    pool = take(data.train_images, job.split.pool)
    return {"aug": job.augment, "consistency": job.consistency, "label_smoothing": job.classifier.label_smoothing,
            "plain": plain, "state": ConsistencyState.start(plain, labeled_y, data.spec.num_classes),
            "pool": pool}


def final_model_state(state: dict[str, Any]) -> dict[str, Any]:
    """From a classifier training checkpoint payload: the last weights and their (logged) validation accuracy."""
    return {
        "state_dict": state["state_dict"],
        "val_acc": float(state.get("val_acc", float("nan"))),
        "step": int(state.get("step", 0)),
        "encoder_pretrained": bool(state.get("encoder_pretrained", False)),
    }
