"""The study's sections: what decides a result (data, split, model, training recipes, the pipeline's
seeds and stages). One frozen dataclass per section, each key with its default, its help text and,
in the section's ``validate``, the rule that key must obey.

Where and how a run executes lives apart, in ``execution_sections.py``: nothing here names a
machine, a folder or a backend, so a stage's key is a plain hash of the study sections it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config.fields import MAX_SEED, _check, _opt


# the pseudo-label threshold schedules (their formulas: ``maths/schedules.py``)
THRESHOLD_SCHEDULES = ("constant", "linear", "exponential", "cosine", "step")


def rate_problem(kind: str, rate: float) -> str | None:
    """Why ``rate`` cannot drive schedule ``kind``, or None (also for kinds that read no rate).

    ``rate`` is a decay factor in (0, 1) for ``exponential`` and a drop in threshold units in
    (0, 1] for ``step``; ``pseudolabel.threshold_rate`` is checked with it, and so is every schedule call.
    """
    if kind == "exponential" and not 0.0 < rate < 1.0:
        return "must be in (0, 1) for exponential"
    if kind == "step" and not 0.0 < rate <= 1.0:
        return "must be in (0, 1] for step"
    return None



BENCHMARKS = ("mnist", "fashion_mnist", "kmnist", "cifar10")  # every training label known (registry.BENCHMARKS)
OWN_DATA = ("folder", "npz")  # a user's images: only the labels they gave exist
DATASETS = BENCHMARKS + OWN_DATA  # toolkit.datasets.registry.LOADERS


@dataclass(frozen=True)
class DataConfig:
    name: str = _opt("mnist", "dataset: mnist, fashion_mnist, kmnist, cifar10 (benchmarks: every training label known, "
                              "the split hides all but split.labels_per_class per class), or your own images: folder "
                              "(run.data_root/labeled/<class>/..., unlabeled/..., optional test/<class>/...) or npz")
    image_size: int = _opt(0, "side the images are converted to, pixels (0: the data's own)")
    channels: int = _opt(0, "1 (grayscale) or 3 (colour) the images are converted to (0: the data's own)")
    train_subset: int = _opt(0, "use only the first N training images of a benchmark (0: all); for tests and smoke runs")
    test_subset: int = _opt(0, "use only the first N test images (0: all)")

    @property
    def own_images(self) -> bool:
        """A user's dataset (its split is the real one; its images travel to Ray's workers by value)."""
        return self.name in OWN_DATA

    def validate(self) -> None:
        _check(self.name in DATASETS, "data.name", f"one of {', '.join(DATASETS)}", self.name)
        _check(self.image_size == 0 or 8 <= self.image_size <= 256, "data.image_size", "0 or in [8, 256]",
               self.image_size)
        _check(self.channels in (0, 1, 3), "data.channels", "0 (the data's own), 1 or 3", self.channels)
        _check(self.train_subset >= 0, "data.train_subset", "must be >= 0", self.train_subset)
        _check(self.test_subset >= 0, "data.test_subset", "must be >= 0", self.test_subset)


@dataclass(frozen=True)
class SplitConfig:
    seed: int = _opt(0, "seed of the labeled/validation/pool split (the split depends on it alone)")
    labels_per_class: int = _opt(10, "labeled images per digit (10 -> the 100-label problem)")
    val_size: int = _opt(1000, "validation images (labels used for model selection only)")

    def validate(self) -> None:
        _check(0 <= self.seed <= MAX_SEED, "split.seed", f"must be in [0, {MAX_SEED}]", self.seed)
        _check(self.labels_per_class >= 1, "split.labels_per_class", "must be >= 1", self.labels_per_class)
        _check(self.val_size >= 1, "split.val_size", "must be >= 1", self.val_size)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("cnn", "encoder: 'cnn' (the toolkit's small CNN: width, depth, convs_per_stage, pool) or "
                            "'resnet18' (torchvision's, adapted to small images: width 64 is torchvision's; pool)")
    width: int = _opt(32, "channels of the first conv stage (doubles each stage)")
    depth: int = _opt(3, "conv stages of the encoder (2..4)")
    convs_per_stage: int = _opt(1, "3x3 convs in each stage after the first (1..3)")
    pool: int = _opt(2, "encoder output: last stage average-pooled to pool x pool cells (1: global pooling)")
    proj_dim: int = _opt(64, "SimCLR projection output size")
    proj_hidden: int = _opt(256, "SimCLR projection hidden size")
    dropout: float = _opt(0.1, "dropout before the classifier head")
    init: str = _opt("scratch", "classifier start: 'scratch' or 'simclr:<checkpoint path | MLflow run id>'")
    sync_bn: bool = _opt(False, "SyncBatchNorm across workers (BatchNorm statistics independent of world size)")
    seed: int = _opt(0, "seed of weight initialisation, batch order and augmentation draws (the split has its own: "
                        "split.seed)")

    def validate(self) -> None:
        _check(self.name in ("cnn", "resnet18"), "model.name", "'cnn' or 'resnet18'", self.name)
        _check(8 <= self.width <= 512, "model.width", "must be in [8, 512]", self.width)
        _check(2 <= self.depth <= 4, "model.depth", "must be in [2, 4]", self.depth)
        _check(1 <= self.convs_per_stage <= 3, "model.convs_per_stage", "must be in [1, 3]", self.convs_per_stage)
        _check(1 <= self.pool <= 3, "model.pool", "must be in [1, 3]", self.pool)
        _check(self.proj_dim >= 2, "model.proj_dim", "must be >= 2", self.proj_dim)
        _check(self.proj_hidden >= 2, "model.proj_hidden", "must be >= 2", self.proj_hidden)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _check(0 <= self.seed <= MAX_SEED, "model.seed", f"must be in [0, {MAX_SEED}]", self.seed)
        _check(
            self.init == "scratch" or (self.init.startswith("simclr:") and len(self.init) > 7),
            "model.init", "'scratch' or 'simclr:<checkpoint path | MLflow run id>'", self.init,
        )


@dataclass(frozen=True)
class AugmentConfig:
    strength: float = _opt(1.0, "global multiplier of every magnitude below (0 turns augmentation off)")
    rotate_deg: float = _opt(15.0, "max rotation, degrees")
    shear_deg: float = _opt(10.0, "max shear, degrees")
    scale_min: float = _opt(0.8, "min zoom (crop-and-resize when > 1)")
    scale_max: float = _opt(1.2, "max zoom")
    translate: float = _opt(0.12, "max translation, fraction of the image side")
    elastic_alpha: float = _opt(1.5, "elastic distortion magnitude, pixels")
    elastic_prob: float = _opt(0.5, "probability of elastic distortion per image")
    blur_prob: float = _opt(0.2, "probability of a Gaussian blur per image")
    erase_prob: float = _opt(0.25, "probability of random erasing per image")
    noise_std: float = _opt(0.05, "std of additive Gaussian noise (images in [0, 1])")
    hflip_prob: float = _opt(0.0, "probability of a left-right mirror per image: 0.5 for data whose classes survive "
                                  "it (photos, CIFAR-10, Fashion-MNIST), 0 for digits and letters")
    colour_jitter: float = _opt(0.4, "colour images only: brightness, contrast and saturation scaled by 1 +- this")
    grayscale_prob: float = _opt(0.2, "colour images only: probability of turning a view grayscale")

    def validate(self) -> None:
        _check(self.strength >= 0, "augment.strength", "must be >= 0", self.strength)
        _check(0 < self.scale_min <= self.scale_max, "augment.scale_min", "must be in (0, scale_max]", self.scale_min)
        for name in ("elastic_prob", "blur_prob", "erase_prob", "hflip_prob", "grayscale_prob"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"augment.{name}", "a probability in [0, 1]", v)
        for name in ("rotate_deg", "shear_deg", "translate", "elastic_alpha", "noise_std", "colour_jitter"):
            v = getattr(self, name)
            _check(v >= 0, f"augment.{name}", "must be >= 0", v)


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = _opt(20, "SimCLR epochs over the training images")
    batch_size: int = _opt(512, "global batch (images; each gives two views), split over workers")
    lr: float = _opt(2e-3, "peak AdamW learning rate")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    warmup_epochs: float = _opt(1.0, "linear warmup length, epochs")
    temperature: float = _opt(0.2, "NT-Xent temperature")
    max_images: int = _opt(0, "images per epoch (0: the whole training set, labels unused)")

    def validate(self) -> None:
        _check(self.epochs >= 1, "pretrain.epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 2, "pretrain.batch_size", "must be >= 2", self.batch_size)
        _check(self.lr > 0, "pretrain.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_epochs >= 0, "pretrain.warmup_epochs", "must be >= 0", self.warmup_epochs)
        _check(self.temperature > 0, "pretrain.temperature", "must be > 0", self.temperature)
        _check(self.max_images >= 0, "pretrain.max_images", "must be >= 0", self.max_images)


@dataclass(frozen=True)
class ProbeConfig:
    checkpoint: str = _opt("", "encoder (required): SimCLR checkpoint path, or the MLflow run id of a pretrain run")
    all_labels: bool = _opt(True, "also train the probes with all training labels (second protocol)")
    knn_k: int = _opt(20, "neighbours of the kNN probe")

    def validate(self) -> None:
        _check(self.knn_k >= 1, "probe.knn_k", "must be >= 1", self.knn_k)


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = _opt(1500, "optimizer steps of the supervised stage")
    eval_every: int = _opt(250, "steps between validation, checkpoint and progress line")
    batch_size: int = _opt(256, "global batch")
    lr: float = _opt(3e-3, "peak AdamW learning rate (one-cycle: warmup then cosine)")
    encoder_lr_scale: float = _opt(0.3, "lr multiplier of a SimCLR-initialised encoder while it trains on the labeled "
                                        "images alone (rounds with pseudo-labels train it at the full rate)")
    weight_decay: float = _opt(5e-4, "AdamW weight decay")
    warmup_steps: int = _opt(100, "linear warmup steps")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing (caps confidence near 1 - smoothing: keep it "
                                       "below 1 - pseudolabel.threshold_start)")

    def validate(self) -> None:
        _check(self.steps >= 1, "classifier.steps", "must be >= 1", self.steps)
        _check(self.eval_every >= 1, "classifier.eval_every", "must be >= 1", self.eval_every)
        _check(self.batch_size >= 1, "classifier.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "classifier.lr", "must be > 0", self.lr)
        _check(self.encoder_lr_scale >= 0, "classifier.encoder_lr_scale", "must be >= 0", self.encoder_lr_scale)
        _check(self.weight_decay >= 0, "classifier.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_steps >= 0, "classifier.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0 <= self.label_smoothing < 1, "classifier.label_smoothing", "must be in [0, 1)", self.label_smoothing)


@dataclass(frozen=True)
class PseudoLabelConfig:
    mode: str = _opt("iterative", "'oneshot' (one round at threshold_start) or 'iterative'")
    rounds: int = _opt(5, "pseudo-labeling rounds (iterative mode)")
    schedule: str = _opt("linear", f"threshold schedule: one of {', '.join(THRESHOLD_SCHEDULES)}")
    threshold_start: float = _opt(0.99, "confidence threshold of round 0, in (0, 1]")
    threshold_floor: float = _opt(0.9, "lowest threshold the schedule may reach, in (0, 1]")
    threshold_rate: float = _opt(0.5, "exponential: factor the gap to the floor shrinks by each round, in (0, 1); "
                                      "step: drop per step in threshold units, in (0, 1] (0.5 drops to the floor at "
                                      "the first step; e.g. 0.02 steps down over the default 5 rounds)")
    step_every: int = _opt(1, "step schedule: rounds between drops")
    class_adaptive: bool = _opt(False, "FlexMatch-style per-class thresholds")
    per_class_cap: int = _opt(0, "max pseudo-labels per predicted digit (0: no cap)")
    warm_start: bool = _opt(True, "each round fine-tunes the previous model (false: from the initial weights)")
    steps_per_round: int = _opt(1500, "optimizer steps per round")
    labeled_fraction: float = _opt(0.25, "share of each batch drawn from the true labels")

    def validate(self) -> None:
        _check(self.mode in ("oneshot", "iterative"), "pseudolabel.mode", "'oneshot' or 'iterative'", self.mode)
        _check(self.rounds >= 1, "pseudolabel.rounds", "must be >= 1", self.rounds)
        _check(self.schedule in THRESHOLD_SCHEDULES, "pseudolabel.schedule",
               f"one of {', '.join(THRESHOLD_SCHEDULES)}", self.schedule)
        _check(0 < self.threshold_start <= 1, "pseudolabel.threshold_start", "must be in (0, 1]", self.threshold_start)
        _check(0 < self.threshold_floor <= 1, "pseudolabel.threshold_floor", "must be in (0, 1]", self.threshold_floor)
        _check(self.threshold_floor <= self.threshold_start, "pseudolabel.threshold_floor",
               f"must be <= threshold_start ({self.threshold_start})", self.threshold_floor)
        _check(self.threshold_rate > 0, "pseudolabel.threshold_rate", "must be > 0", self.threshold_rate)
        rate_rule = rate_problem(self.schedule, self.threshold_rate)  # the schedule's own rule
        _check(rate_rule is None, "pseudolabel.threshold_rate", rate_rule or "", self.threshold_rate)
        _check(self.step_every >= 1, "pseudolabel.step_every", "must be >= 1", self.step_every)
        _check(self.per_class_cap >= 0, "pseudolabel.per_class_cap", "must be >= 0", self.per_class_cap)
        _check(self.steps_per_round >= 1, "pseudolabel.steps_per_round", "must be >= 1", self.steps_per_round)
        _check(0 < self.labeled_fraction <= 1, "pseudolabel.labeled_fraction", "must be in (0, 1]", self.labeled_fraction)


TUNE_OBJECTIVES = ("validation", "label_folds")
SMOOTH_SPACES = ("simclr", "pixels")


@dataclass(frozen=True)
class TuneConfig:
    space: str = _opt("", "YAML file with the search space (empty: the built-in MNIST space)")
    num_samples: int = _opt(8, "trials")
    search: str = _opt("random", "'random' or 'optuna' (TPE; needs the optuna extra)")
    grace_rounds: int = _opt(1, "ASHA: rounds every trial gets before it may be stopped")
    reduction_factor: int = _opt(2, "ASHA reduction factor")
    pool_subset: int = _opt(0, "use only N pool images per trial (0: the whole pool)")
    include_base: bool = _opt(True, "the first trial runs the base config's own values of the searched keys (the "
                                    "hand-picked schedule), when they lie in the space: the search starts from it")
    objective: str = _opt("validation", "what a trial reports after each round: 'validation' (accuracy on the "
                                        "validation split: the standard protocol) or 'label_folds' (the strict "
                                        "protocol: the held-out accuracy over tune.folds folds of the labeled images, "
                                        "each held out in turn; reads no label beyond them; the only objective for "
                                        "a user's own dataset)")
    folds: int = _opt(5, "label_folds: how many folds (each trial trains its rounds once per fold; at most the "
                         "smallest class's labeled images)")

    def validate(self) -> None:
        _check(self.objective in TUNE_OBJECTIVES, "tune.objective", f"one of {', '.join(TUNE_OBJECTIVES)}",
               self.objective)
        _check(self.folds >= 2, "tune.folds", "must be >= 2", self.folds)
        _check(self.num_samples >= 1, "tune.num_samples", "must be >= 1", self.num_samples)
        _check(self.search in ("random", "optuna"), "tune.search", "'random' or 'optuna'", self.search)
        _check(self.grace_rounds >= 1, "tune.grace_rounds", "must be >= 1", self.grace_rounds)
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2", self.reduction_factor)
        _check(self.pool_subset >= 0, "tune.pool_subset", "must be >= 0", self.pool_subset)


@dataclass(frozen=True)
class StudentConfig:
    steps: int = _opt(1500, "optimizer steps of the student on the true labels + the teachers' ensemble labels")
    min_confidence: float = _opt(0.0, "least averaged teacher confidence for a pool image to get a label (0: every "
                                      "pool image is labeled)")
    warm_start: bool = _opt(True, "start from the first teacher (the scratch iterative model); false: from scratch")
    knn_k: int = _opt(5, "average the teachers' probabilities over each pool image's k nearest neighbours in the "
                         "space student.smooth_space names (the labeled images count as certain); 0: off")
    smooth_space: str = _opt("simclr", "where those neighbours are found: 'simclr' (the SimCLR embedding; needs the "
                                       "encoder) or 'pixels' (the images' own pixels, cosine similarity: for small "
                                       "centred scans, whose raw pixels already group by class)")
    tta_views: int = _opt(8, "the student predicts (its validation and test figures, `toolkit predict` on its model file) "
                             "as the mean softmax over the plain image and this many augmented copies; 0: plain")
    tta_strength: float = _opt(0.5, "augment.strength of those copies (the training augmentation, scaled)")
    teachers: list = _opt([], "`toolkit student`: the teacher classifiers (model.pt paths or MLflow run ids of "
                              "pseudolabel/supervised runs); the pipeline passes its own")
    encoder: str = _opt("", "`toolkit student`: the SimCLR checkpoint (path or pretrain run id) whose embedding "
                            "smooths the teachers' labels; empty: no smoothing")

    def validate(self) -> None:
        _check(all(isinstance(t, str) and t for t in self.teachers), "student.teachers",
               "a list of model.pt paths or MLflow run ids", self.teachers)
        _check(self.steps >= 1, "student.steps", "must be >= 1", self.steps)
        _check(self.knn_k >= 0, "student.knn_k", "must be >= 0", self.knn_k)
        _check(self.smooth_space in SMOOTH_SPACES, "student.smooth_space", f"one of {', '.join(SMOOTH_SPACES)}",
               self.smooth_space)
        _check(0.0 <= self.min_confidence <= 1.0, "student.min_confidence", "must be in [0, 1]", self.min_confidence)
        _check(self.tta_views >= 0, "student.tta_views", "must be >= 0", self.tta_views)
        _check(self.tta_strength >= 0, "student.tta_strength", "must be >= 0", self.tta_strength)


@dataclass(frozen=True)
class ConsistencyConfig:
    """Online consistency training (FixMatch with an EMA teacher) added to every classifier training of the study."""

    weight: float = _opt(0.0, "weight of the unlabeled consistency loss (FixMatch's lambda_u); 0: off, the classifiers "
                              "learn from labels and pseudo-labels alone")
    unlabeled_ratio: int = _opt(2, "unlabeled pool images per labeled-batch image in each step (FixMatch's mu)")
    threshold_start: float = _opt(0.95, "confidence the EMA teacher's weak-view prediction needs at the first step")
    threshold_floor: float = _opt(0.95, "the threshold at the last step (the schedule softens it from start to floor)")
    schedule: str = _opt("constant", "how the threshold moves over the training's eval_every chunks: "
                                     + ", ".join(THRESHOLD_SCHEDULES) + " (the pseudo-labeler's schedules)")
    rate: float = _opt(0.5, "exponential: decay factor in (0, 1); step: drop per step")
    class_adaptive: bool = _opt(False, "FlexMatch: each class's threshold scaled by how often the teacher is confident "
                                       "about it (statistics summed over all workers)")
    distribution_alignment: bool = _opt(False, "ReMixMatch: the teacher's probabilities rescaled so that its running "
                                               "mean prediction matches the labeled class frequencies")
    ema_decay: float = _opt(0.999, "the teacher's weights: exponential moving average of the student's")
    weak_strength: float = _opt(0.3, "augment.strength of the teacher's (weak) views")
    strong_strength: float = _opt(1.3, "augment.strength of the student's (strong) views")

    def validate(self) -> None:
        _check(self.weight >= 0, "consistency.weight", "must be >= 0", self.weight)
        _check(self.unlabeled_ratio >= 1, "consistency.unlabeled_ratio", "must be >= 1", self.unlabeled_ratio)
        for name in ("threshold_start", "threshold_floor"):
            v = getattr(self, name)
            _check(0.0 < v <= 1.0, f"consistency.{name}", "must be in (0, 1]", v)
        _check(self.threshold_floor <= self.threshold_start, "consistency.threshold_floor",
               "must be <= consistency.threshold_start", self.threshold_floor)
        _check(self.schedule in THRESHOLD_SCHEDULES, "consistency.schedule", f"one of {', '.join(THRESHOLD_SCHEDULES)}",
               self.schedule)
        problem = rate_problem(self.schedule, self.rate)
        _check(problem is None, "consistency.rate", problem or "", self.rate)
        _check(0.0 <= self.ema_decay < 1.0, "consistency.ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.weak_strength >= 0, "consistency.weak_strength", "must be >= 0", self.weak_strength)
        _check(self.strong_strength >= 0, "consistency.strong_strength", "must be >= 0", self.strong_strength)


PIPELINE_STAGES = ("pretrain", "probe", "supervised", "oneshot", "iterative", "simclr_iterative", "student")


@dataclass(frozen=True)
class PipelineConfig:
    seeds: list = _opt([0], "split seeds; the study is repeated per seed and reported as mean ± std")
    stages: list = _opt(list(PIPELINE_STAGES), "stages to run, in order")
    tune: bool = _opt(False, "run the Tune search before the final iterative stage and use its best schedule")

    def validate(self) -> None:
        _check(len(self.seeds) >= 1 and all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds),
               "pipeline.seeds", "a non-empty list of integers", self.seeds)
        _check(all(0 <= s <= MAX_SEED for s in self.seeds), "pipeline.seeds", f"seeds in [0, {MAX_SEED}]", self.seeds)
        _check(len(set(self.seeds)) == len(self.seeds), "pipeline.seeds", "each seed once", self.seeds)
        _check(all(isinstance(s, str) for s in self.stages), "pipeline.stages", "a list of stage names", self.stages)
        bad = [s for s in self.stages if s not in PIPELINE_STAGES]
        _check(not bad, "pipeline.stages", f"stages among {', '.join(PIPELINE_STAGES)}", self.stages)
        # the search tunes the SimCLR-initialised stage's schedule: without that stage it would tune nothing
        _check(not self.tune or "simclr_iterative" in self.stages, "pipeline.tune",
               "true needs 'simclr_iterative' in pipeline.stages (the search tunes that stage's schedule)", self.tune)
