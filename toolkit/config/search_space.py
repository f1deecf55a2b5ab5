"""The search-space language of ``toolkit tune``: a YAML space, parsed and validated, and a trial's config from a point.

Pure: no Ray and no MLflow (``SearchSpace.param_space`` imports Ray Tune when the driver asks).

A space file maps dotted keys to one domain each::

    pseudolabel.schedule: {choice: [linear, cosine, class-adaptive]}
    pseudolabel.threshold_start: {uniform: [0.9, 0.999]}
    pseudolabel.threshold_gap: {uniform: [0.0, 0.25]}
    classifier.lr: {loguniform: [0.001, 0.01]}
    pseudolabel.rounds: {randint: [3, 8]}          # both ends included

Which keys can be searched derives from ``config.STAGE_SECTIONS``: the keys that decide a
pseudo-labeling run's result (``result_keys("pseudolabel")``), less the images every trial
is scored on (``data.*``, ``split.*``), the seed and the mode (every trial is iterative).
Infrastructure keys are never searched and never written to ``best.yaml``.

The space is parametrised so that every point of it is a config the trial can run as
sampled, with nothing moved: a floor above the start cannot be sampled, because the space
searches the gap ``pseudolabel.threshold_gap`` (the trial's ``threshold_floor`` is
``threshold_start - threshold_gap``), and the threshold keys (schedule, start, gap or
floor, rate) are checked at every corner of their ranges when the file is read, so a
rate range must suit every schedule the space can pick. A point the config still rejects
(two augment keys that clash, say) is a failed trial with the config's message.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable

import yaml

from toolkit.config import EXECUTION_SECTIONS, ConfigError, Study, all_keys, read_text_file, result_keys
from toolkit.config.parsing import safe_load_unique

DOMAINS = ("choice", "uniform", "loguniform", "randint")
CLASS_ADAPTIVE = "class-adaptive"  # schedule choice: FlexMatch thresholds on a constant base threshold
SIMCLR = "simclr"                  # model.init choice: the base config's SimCLR checkpoint
BUILTIN_SPACE = Path(__file__).resolve().parents[1] / "profiles" / "tune_space.yaml"

TRIAL_STAGE = "pseudolabel"        # what each trial runs
SAME_FOR_ALL = ("data", "split")   # the images: every trial is scored on the same validation images
FIXED_KEYS = {"pseudolabel.mode": "every trial runs the iterative rounds",
              "model.seed": "a seed is noise to average over, not a setting to pick"}
GAP = "pseudolabel.threshold_gap"
DERIVED = {GAP: "pseudolabel.threshold_floor"}  # a searched key that is no config key -> the config key it sets
# checked jointly at every corner of their ranges (their constraints tie them together)
THRESHOLD_KEYS = ("pseudolabel.schedule", "pseudolabel.threshold_start", "pseudolabel.threshold_floor", GAP,
                  "pseudolabel.threshold_rate")


def tunable_keys() -> list[str]:
    """The keys a space may search: what decides a trial's result, less the shared images, the seed and the mode."""
    keys = [k for k in result_keys(TRIAL_STAGE) if k.split(".")[0] not in SAME_FOR_ALL and k not in FIXED_KEYS]
    return keys + list(DERIVED)


def reproduce_keys() -> list[str]:
    """The keys ``best.yaml`` may carry: what decides a pseudo-labeling result, less ``data.*`` (the command line's)."""
    return [k for k in result_keys(TRIAL_STAGE) if k.split(".")[0] != "data"]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: searched key -> (domain, values), in file order."""

    entries: dict[str, tuple[str, list]]
    max_rounds: int
    source: str
    notes: tuple[str, ...] = ()

    def param_space(self) -> dict[str, Any]:
        """Ray Tune domains, one flat dotted key each (randint's upper end made exclusive, as Tune wants)."""
        from ray import tune as ray_tune

        out = {}
        for key, (domain, values) in self.entries.items():
            if domain == "choice":
                out[key] = ray_tune.choice(list(values))
            elif domain == "uniform":
                out[key] = ray_tune.uniform(*values)
            elif domain == "loguniform":
                out[key] = ray_tune.loguniform(*values)
            else:
                out[key] = ray_tune.randint(values[0], values[1] + 1)
        return out

    def config_keys(self) -> list[str]:
        """The config keys a point sets (a derived key names the key it sets)."""
        return [DERIVED.get(k, k) for k in self.entries]

    def columns(self) -> list[str]:
        """The searched keys, each derived key followed by the config key it sets (trials.csv)."""
        return [c for k in self.entries for c in ((k, DERIVED[k]) if k in DERIVED else (k,))]


def read_space(study: Study) -> tuple[str, str]:
    """(YAML text, where it came from): the file ``tune.space``, else the built-in space."""
    if not study.tune.space:
        return BUILTIN_SPACE.read_text(), "built-in"
    return read_text_file(study.tune.space, "tune.space"), str(Path(study.tune.space).expanduser().resolve())


def point_overrides(base: Study, point: dict[str, Any], simclr: str | None = None) -> dict[str, Any]:
    """A point of the space -> the dotted overrides of its trial config.

    Two values name more than one key (``class-adaptive``: a constant schedule with
    per-class thresholds; ``simclr``: ``simclr:<the base config's checkpoint>``) and the
    gap sets the floor under the start. Nothing is clipped: what the config rejects fails.
    """
    ov = {k: v for k, v in point.items() if k not in DERIVED}
    if ov.get("pseudolabel.schedule") == CLASS_ADAPTIVE:
        ov["pseudolabel.schedule"] = "constant"
        ov["pseudolabel.class_adaptive"] = True
    if ov.get("model.init") == SIMCLR:
        if not simclr:
            raise ConfigError("model.init='simclr' is not allowed: the base config has no SimCLR checkpoint (model.init)")
        ov["model.init"] = f"simclr:{simclr}"
    start = _as_number(ov.get("pseudolabel.threshold_start", base.pseudolabel.threshold_start))
    if GAP in point and _number(start):  # (a start that is no number: the config names it)
        ov[DERIVED[GAP]] = _minus(start, point[GAP])
    return ov


def _minus(a: float, b: float) -> float:
    """``a - b`` on the decimals the floats print as (0.99 - 0.09 is 0.9, not 0.9000000000000001).

    So a written floor survives floor -> gap -> floor exactly (``base_point``). Never above
    ``a`` when ``b >= 0``: the decimal difference is exact and rounding to a float is monotone.
    """
    return float(Decimal(repr(float(a))) - Decimal(repr(float(b))))


def trial_config(base: Study, point: dict[str, Any], simclr: str | None = None) -> Study:
    """The validated config of the trial at ``point`` (before the driver's execution settings)."""
    return base.replace(**point_overrides(base, point, simclr))


def schedule_kind(study: Study) -> str:
    """The schedule as the space names it: ``linear``, ..., ``class-adaptive`` or ``<schedule>+class-adaptive``."""
    pc = study.pseudolabel
    if pc.class_adaptive:
        return CLASS_ADAPTIVE if pc.schedule == "constant" else f"{pc.schedule}+{CLASS_ADAPTIVE}"
    return pc.schedule


def trial_values(space: SearchSpace, study: Study, point: dict[str, Any]) -> dict[str, Any]:
    """The columns of ``space`` for one trial: config keys as the trial's config holds them, derived keys as sampled."""
    flat = study.flat()
    return {c: point[c] if c in DERIVED else flat[c] for c in space.columns()}


# --------------------------------------------------------------------------- parsing


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, [*all_keys(), *DERIVED], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"tune.space ({source}): unknown config key '{key}'{hint}")


def _untunable(key: str, source: str) -> ConfigError:
    if key in FIXED_KEYS:
        why = FIXED_KEYS[key]
    elif key.split(".")[0] in EXECUTION_SECTIONS:
        why = "it says where or how a run executes, not what it computes"
    elif key.split(".")[0] in SAME_FOR_ALL:
        why = "every trial is scored on the same images (data.*, split.*)"
    else:
        why = "it does not decide a pseudo-labeling run's result"
    return ConfigError(f"tune.space ({source}): '{key}' cannot be tuned: {why}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_number(x: Any) -> Any:
    """YAML reads ``1e-3`` (no dot) as a string: take it as the number it means."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _domain(key: str, spec: Any, source: str) -> tuple[str, list]:
    """One entry's (domain, values), checked against the key's type (not yet against the config's rules)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"tune.space ({source}): '{key}' needs exactly one of "
                          f"{{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {spec!r}")
    domain, values = next(iter(spec.items()))
    where = f"tune.space ({source}): {key}: {domain}"
    if domain == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where} needs a non-empty list")
        for v in values:
            if v == CLASS_ADAPTIVE and key != "pseudolabel.schedule" or v == SIMCLR and key != "model.init":
                raise ConfigError(f"{where}: {v!r} is only a value of "
                                  f"{'pseudolabel.schedule' if v == CLASS_ADAPTIVE else 'model.init'}")
        if key in DERIVED:
            values = [_as_number(v) for v in values]
            if not all(_number(v) for v in values):
                raise ConfigError(f"{where} needs numbers; got {values!r}")
        return domain, list(values)
    values = [_as_number(v) for v in values] if isinstance(values, list) else values
    if not (isinstance(values, list) and len(values) == 2 and all(_number(v) for v in values)):
        raise ConfigError(f"{where} needs [lo, hi], two numbers; got {values!r}")
    lo, hi = values
    default = all_keys()[DERIVED.get(key, key)].default
    if domain == "randint":
        if isinstance(default, bool) or not isinstance(default, int):
            use = "uniform, loguniform or choice" if isinstance(default, float) else "choice"
            raise ConfigError(f"{where} is for integer keys; '{key}' takes {type(default).__name__}: use {use}")
        if not (float(lo).is_integer() and float(hi).is_integer()) or lo > hi:
            raise ConfigError(f"{where} needs integers lo <= hi; got {values!r}")
        return domain, [int(lo), int(hi)]
    if not isinstance(default, float):
        raise ConfigError(f"{where} is for float keys; '{key}' takes {type(default).__name__}: "
                          f"use {'randint' if isinstance(default, int) and not isinstance(default, bool) else 'choice'}")
    if not lo < hi or (domain == "loguniform" and lo <= 0):
        raise ConfigError(f"{where} needs lo < hi{' and lo > 0' if domain == 'loguniform' else ''}; got {values!r}")
    if key == GAP and lo < 0:
        raise ConfigError(f"{where} needs lo >= 0 (a floor above the start is no schedule); got {values!r}")
    return domain, [float(lo), float(hi)]


def _check_point(base: Study, point: dict[str, Any], simclr: str | None, source: str) -> None:
    try:
        trial_config(base, point, simclr)
    except ConfigError as e:
        extra = f" (or {CLASS_ADAPTIVE})" if "pseudolabel.schedule=" in str(e) else ""
        at = ", ".join(f"{k}={v!r}" for k, v in point.items())
        if {"pseudolabel.threshold_start", "pseudolabel.threshold_floor"} <= set(point):
            extra += f"; search '{GAP}' (threshold_start - threshold_floor) instead of the floor"
        raise ConfigError(f"tune.space ({source}): {e}{extra} (at {at})") from None


def parse_space(text: str, source: str, base: Study, simclr: str | None = None,
                base_model: str | None = None) -> SearchSpace:
    """Parse and validate a space file: every value, and every corner of the threshold keys, gives a valid trial.

    ``simclr``: resolved SimCLR checkpoint of the base config (else the ``simclr`` choice is
    dropped). With a shared ``base_model`` the round-0 model is fixed, so ``model.init`` is
    not searched.
    """
    try:
        tree = safe_load_unique(text) or {}  # a key given twice is an error, not silently the last one
    except yaml.YAMLError as e:
        raise ConfigError(f"tune.space ({source}) is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"tune.space ({source}): expected a mapping of dotted keys, got {type(tree).__name__}")
    known, tunable = set(all_keys()) | set(DERIVED), set(tunable_keys())
    entries: dict[str, tuple[str, list]] = {}
    notes: list[str] = []
    for key, spec in tree.items():
        key = str(key)
        if key not in known:
            raise _unknown_key(key, source)
        if key not in tunable:
            raise _untunable(key, source)
        domain, values = _domain(key, spec, source)
        if key == "model.init" and base_model:
            notes.append("model.init is not searched: the trials share the given base model (its init is fixed)")
            continue
        if key == "model.init" and SIMCLR in values and not simclr:
            values = [v for v in values if v != SIMCLR]
            notes.append("model.init: no SimCLR checkpoint in the base config (model.init), searching without it")
            if not values or values == [base.model.init]:
                continue
        if key not in THRESHOLD_KEYS:  # the threshold keys are checked together below
            for v in values:
                _check_point(base, {key: v}, simclr, source)
        entries[key] = (domain, values)
    if not entries:
        raise ConfigError(f"tune.space ({source}): nothing to search")
    _check_together(entries, source)
    group = [k for k in THRESHOLD_KEYS if k in entries]
    for corner in itertools.product(*(entries[k][1] for k in group)):
        _check_point(base, dict(zip(group, corner)), simclr, source)
    if "pseudolabel.rounds" in entries:
        max_rounds = max(int(v) for v in entries["pseudolabel.rounds"][1])
    else:
        max_rounds = base.pseudolabel.rounds
    if base.tune.grace_rounds > max_rounds:
        raise ConfigError(f"tune.grace_rounds={base.tune.grace_rounds} is not allowed: must be <= the most rounds "
                          f"a trial runs ({max_rounds})")
    return SearchSpace(entries, max_rounds, source, tuple(notes))


def _check_together(entries: dict[str, tuple[str, list]], source: str) -> None:
    """Two searched keys that would set one config key: the second would silently replace the first."""
    if GAP in entries and DERIVED[GAP] in entries:
        raise ConfigError(f"tune.space ({source}): '{GAP}' and '{DERIVED[GAP]}' both set the floor: search one of them")
    if "pseudolabel.class_adaptive" in entries and CLASS_ADAPTIVE in entries.get("pseudolabel.schedule", ("", []))[1]:
        raise ConfigError(f"tune.space ({source}): the schedule choice '{CLASS_ADAPTIVE}' sets pseudolabel.class_adaptive, "
                          "which the space also searches: search one of them")


# --------------------------------------------------------------------------- the base point and best.yaml


def base_point(base: Study, space: SearchSpace) -> dict[str, Any] | None:
    """The base config's own values of the searched keys, as a point of the space (None if one lies outside it).

    Evaluated as the first trial (``tune.include_base``): the search then starts from the
    hand-picked schedule, and its best trial is never worse than it on validation. Its
    trial config is the base config exactly for floors as people write them (0.9, 0.3); a
    17-digit floor far below the start may come back a float step (~1e-16) off.
    """
    flat = base.flat()
    pc = base.pseudolabel
    point: dict[str, Any] = {}
    for key, (domain, values) in space.entries.items():
        v = _minus(pc.threshold_start, pc.threshold_floor) if key == GAP else flat[key]
        if key == "pseudolabel.schedule" and pc.class_adaptive:
            if v != "constant":
                return None  # class-adaptive thresholds on another schedule: not a point of the space
            v = CLASS_ADAPTIVE
        if key == "model.init" and v != "scratch" and SIMCLR in values:
            v = SIMCLR
        if domain == "choice":
            if v not in values:
                return None
        elif not values[0] <= v <= values[1]:
            return None
        point[key] = v
    return point


def best_overrides(base: Study, tuned: Study, keys: Iterable[str]) -> dict[str, Any]:
    """What ``best.yaml`` holds: the tuned config's keys that decide its result and differ from a default run.

    The searched config keys (always, even at their defaults), any key the point changed
    from the base config, and every other non-default key of ``reproduce_keys()`` (a CPU
    profile's narrow model, say): so that ``toolkit pseudolabel --config best.yaml``
    trains the trial's model and not the default one. Never ``data.*`` or an
    infrastructure key: those belong to the machine, and the command line adds them.
    """
    b, t, d = base.flat(), tuned.flat(), Study().flat()
    chosen = set(keys) | {k for k in t if t[k] != b[k] or t[k] != d[k]} | {"pseudolabel.mode"}  # mode: always iterative
    if "pseudolabel.schedule" in chosen:
        chosen.add("pseudolabel.class_adaptive")  # a kind is (schedule, class_adaptive): write both
    return {k: t[k] for k in reproduce_keys() if k in chosen}


def nested(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted keys -> one mapping per section (the YAML form of a config file)."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in overrides.items():
        section, name = k.split(".", 1)
        out.setdefault(section, {})[name] = v
    return out
