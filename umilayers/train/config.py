"""What :func:`~umilayers.train.fit` takes: the method and one config per concern.

- :class:`~umilayers.model.ModelConfig`: the model's hyper-parameters (``dim``, ``num_tokens``,
  ``projection_depth``, ...), the constructor arguments of the same names;
- :class:`TrainConfig`: what the optimisation computes (epochs of both stages, the pseudo-label
  window, batch size, learning rate and schedule, seed, autocast, compile);
- :class:`RuntimeConfig`: how a run executes but not what it computes (device, DataLoader
  workers, progress bars): free to differ when a run is resumed;
- :class:`FitConfig`: the method (``method``, ``modality``, ``predictor``) and the three above.

Every field is an option (:func:`umilayers._config.option`): its name is the keyword argument of
:func:`~umilayers.train.fit` (``fit(store, "umi", out, epochs=2, num_tokens=8)``), the key in a
run's ``config.json`` and the flag of ``umilayers fit`` (``--epochs``, ``--num-tokens``), whose
options are generated from these fields (:mod:`umilayers.cli`). Names are unique across the
concerns.

Example::

    >>> cfg = FitConfig.from_options(method="late-fusion", epochs=2, dim=32, heads=4, device="cpu")
    >>> cfg.train.epochs, cfg.model.dim, cfg.runtime.device, cfg.uses_pseudo_labels
    (2, 32, 'cpu', False)
    >>> FitConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> FitConfig.from_options(epochs=0)
    Traceback (most recent call last):
    ...
    umilayers._validation.InvalidArgument: epochs: expected an int >= 1, got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from umilayers._config import Config, OptionSpec, option, option_specs
from umilayers._validation import InvalidArgument
from umilayers.baselines import METHODS, PREDICTORS
from umilayers.model import ModelConfig
from umilayers.pseudo_labels import MAX_WINDOW

__all__ = ["BASE_LR", "BASE_BATCH", "OPTIMIZERS", "SCHEDULES", "TrainConfig", "RuntimeConfig", "FitConfig",
           "drop_epochs"]

#: Default peak learning rate of optimizer adamw at :data:`BASE_BATCH` (chosen on val: ``docs/training.rst``).
BASE_LR = 2e-3
#: The batch size :data:`BASE_LR` is for; other sizes scale it by ``sqrt(batch_size / BASE_BATCH)``.
BASE_BATCH = 64
#: Optimisers of :class:`TrainConfig`: AdamW (this library's) or SGD with momentum (the authors'
#: released ``train.py``: momentum 0.9, weight decay 5e-4).
OPTIMIZERS = ("adamw", "sgd")
#: Learning-rate schedules of :class:`TrainConfig` (after the optional linear warm-up): cosine
#: decay to 0 (this library's), steps (multiply by ``lr_drop_factor`` at each of
#: ``lr_drop_epochs``: the paper's EPIC-Kitchens schedule), or constant.
SCHEDULES = ("cosine", "step", "constant")


def drop_epochs(text: str) -> tuple[int, ...]:
    """The epochs of ``lr_drop_epochs``: ``"70"`` -> ``(70,)``, ``"30,45"`` -> ``(30, 45)``,
    ``""`` -> ``()``.

    Raises:
        InvalidArgument: not comma-separated non-negative integers in increasing order.

    Example::

        >>> drop_epochs("30, 45")
        (30, 45)
    """
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if not all(p.isdigit() for p in parts):
        raise InvalidArgument("lr_drop_epochs", f"expected comma-separated epochs (ints >= 0), got {text!r}")
    epochs = tuple(int(p) for p in parts)
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise InvalidArgument("lr_drop_epochs", f"expected increasing epochs, got {text!r}")
    return epochs


@dataclass(frozen=True)
class TrainConfig(Config):
    """Optimisation and schedule of both stages (part of what a run computes).

    AdamW with a linear warm-up (one epoch by default) then cosine decay per step is this
    library's default; SGD with momentum and a step schedule (the authors' released code's
    optimiser, the paper's EPIC schedule) are reachable by name: ``optimizer="sgd"``,
    ``schedule="step"`` with ``lr_drop_epochs``. The schedule runs per stage, with the stage's
    epochs; a drop epoch beyond a stage's last epoch is never reached in it. The peak learning
    rate is ``lr`` when given, else (optimizer adamw) :data:`BASE_LR` at batch size
    :data:`BASE_BATCH` scaled by the square root of ``batch_size / BASE_BATCH`` (the square-root
    rule for Adam-type optimisers; :meth:`peak_lr`); optimizer sgd needs an ``lr``. These
    defaults were chosen on val splits (``docs/training.rst``). Every epoch's sample order and
    random state derive from ``seed``.

    Example::

        >>> TrainConfig(epochs=2, lr=3e-3).replace(amp=True).amp
        True
        >>> TrainConfig(batch_size=256).peak_lr() == 2 * TrainConfig().peak_lr()
        True
        >>> TrainConfig(optimizer="sgd", lr=1e-2, schedule="step", lr_drop_epochs="70").lr_drop_factor
        0.1
        >>> TrainConfig(schedule="step")
        Traceback (most recent call last):
        ...
        umilayers._validation.InvalidArgument: lr_drop_epochs: schedule 'step' needs at least one epoch
        to drop the learning rate at
    """

    seed: int = option(0, "seeds model initialisation, sample order and dropout", minimum=0)
    epochs: int = option(30, "epochs of the multimodal stage", minimum=1)
    unimodal_epochs: int = option(20, "epochs of each unimodal model (stage 1, which makes the pseudo-labels)",
                                  minimum=0)
    pseudo_window: Optional[int] = option(None, "last unimodal epochs whose predictions are averaged into "
                                                "pseudo-labels (the paper's e); None: min(10, unimodal_epochs)",
                                          minimum=0)
    batch_size: int = option(64, "global batch size (split over the processes under torchrun)", minimum=1)
    lr: Optional[float] = option(None, f"peak learning rate; None: {BASE_LR:g} * sqrt(batch_size / {BASE_BATCH}) "
                                       f"for optimizer adamw (the square-root rule; sgd needs a value)", minimum=0,
                                 strict=True)
    optimizer: str = option("adamw", "adamw (this library's) or sgd (with momentum; the authors' released code)",
                            choices=OPTIMIZERS)
    momentum: float = option(0.9, "momentum of optimizer sgd", minimum=0)
    weight_decay: float = option(0.01, "weight decay (decoupled for adamw, L2 for sgd; the released code: sgd "
                                       "with 5e-4)", minimum=0)
    schedule: str = option("cosine", "learning rate after the warm-up: cosine decay to 0, step (times "
                                     "lr_drop_factor at each of lr_drop_epochs) or constant", choices=SCHEDULES)
    lr_drop_epochs: str = option("", "schedule step: comma-separated epochs after which the learning rate "
                                     "drops, e.g. 70 (the paper's EPIC: 1e-4 for epochs 1-70, 1e-5 for the last 50)")
    lr_drop_factor: float = option(0.1, "schedule step: factor applied at each drop epoch", minimum=0, strict=True)
    warmup_epochs: int = option(1, "epochs of linear warm-up before the schedule", minimum=0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", minimum=0)
    pair_same_label: float = option(0.0, "not in the paper, classification: probability that a training row is "
                                         "replaced by a same-label row joined with another row's modalities "
                                         "(umilayers.data.pair_same_label)", minimum=0)
    amp: bool = option(False, "bf16 autocast (CUDA and CPU)")
    compile: bool = option(False, "torch.compile the model")

    #: Removed: out-of-fold pseudo-labels (1: the paper's, every row labelled by models that trained on it).
    retired = {"pseudo_folds": 1}

    def check(self) -> None:
        drops = drop_epochs(self.lr_drop_epochs)
        if self.schedule == "step" and not drops:
            raise InvalidArgument("lr_drop_epochs", "schedule 'step' needs at least one epoch to drop the learning "
                                                    "rate at")
        if drops and self.schedule != "step":
            raise InvalidArgument("lr_drop_epochs", f"only used by {{schedule}} 'step', got schedule "
                                                    f"{self.schedule!r}", refs=("schedule",))
        if self.lr is None and self.optimizer != "adamw":
            raise InvalidArgument("lr", f"optimizer {self.optimizer!r} needs a learning rate (the default rule, "
                                        f"{BASE_LR:g} * sqrt(batch_size / {BASE_BATCH}), was measured for adamw)")
        if self.pair_same_label > 1:
            raise InvalidArgument("pair_same_label", f"expected a probability in [0, 1], got {self.pair_same_label}")

    def window(self) -> int:
        """The pseudo-label window in epochs: ``pseudo_window``, or ``min(10, unimodal_epochs)``.

        Example::

            >>> TrainConfig().window(), TrainConfig(unimodal_epochs=3).window()
            (10, 3)
        """
        return min(10, self.unimodal_epochs) if self.pseudo_window is None else self.pseudo_window

    def peak_lr(self) -> float:
        """The peak learning rate: ``lr``, or ``BASE_LR * sqrt(batch_size / BASE_BATCH)``."""
        if self.lr is not None:
            return float(self.lr)
        return BASE_LR * math.sqrt(self.batch_size / BASE_BATCH)


@dataclass(frozen=True)
class RuntimeConfig(Config):
    """How a run executes but not what it computes: free to differ when a run is resumed.

    Example::

        >>> RuntimeConfig(device="cpu", quiet=True).num_workers
        0
    """

    device: str = option("auto", "auto, cpu, cuda, cuda:1, ... (auto: a GPU when there is one; under torchrun "
                                 "each process takes its local rank's)")
    num_workers: int = option(0, "DataLoader worker processes", minimum=0)
    quiet: bool = option(False, "no progress lines (one per epoch on stderr otherwise)")


#: The concerns of a :class:`FitConfig`: field name -> config class.
CONCERNS: dict[str, type[Config]] = {"model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True)
class FitConfig(Config):
    """Every option of :func:`~umilayers.train.fit`: the method and one config per concern.

    Saved in a run's ``config.json`` and checkpoints (:meth:`to_dict`, nested by concern). A run
    resumes only with the same options but :class:`RuntimeConfig`'s (:meth:`result_options`).

    Example::

        >>> cfg = FitConfig(method="unimodal", modality="rgb", train=TrainConfig(epochs=3))
        >>> cfg.options()["epochs"], cfg.options()["dim"]
        (3, 256)
    """

    method: str = option("umi", "what to train: the paper's model, its baselines and the pooled-projection "
                                "ablation", choices=METHODS)
    modality: Optional[str] = option(None, "the modality of method 'unimodal'")
    predictor: str = option("transformer", "predictor of the unimodal models (stage 1, the late-fusion members, "
                                           "method 'unimodal'): a transformer of projection_depth layers over the "
                                           "tokens, or linear on mean-pooled tokens (the paper's; on token data it "
                                           "learns next to nothing)",
                            choices=PREDICTORS)
    subset_ensemble: bool = option(False, "not in the paper; methods umi and pooled, at evaluation: average the "
                                          "fused prediction with the predictions from each training split's "
                                          "modality set that a row has more than")
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def check(self) -> None:
        if self.method == "unimodal" and not self.modality:
            raise InvalidArgument("modality", "method 'unimodal' needs the modality to train on")
        if self.subset_ensemble and self.method not in ("umi", "pooled"):
            raise InvalidArgument("subset_ensemble", f"only methods 'umi' and 'pooled' have it, got method "
                                                     f"{self.method!r}")
        if self.method != "unimodal" and self.modality:
            raise InvalidArgument("modality", f"only used by method 'unimodal', got modality={self.modality!r} "
                                              f"with method {self.method!r}")
        if self.uses_pseudo_labels:
            train = self.train
            if train.unimodal_epochs < 1:
                raise InvalidArgument("unimodal_epochs", "pseudo-labels need at least one unimodal epoch "
                                                         "(or turn {use_pseudo} off)", refs=("use_pseudo",))
            limit = min(train.unimodal_epochs, MAX_WINDOW)  # the bank averages at most MAX_WINDOW epochs
            if train.pseudo_window is not None and not 1 <= train.pseudo_window <= limit:
                raise InvalidArgument(
                    "pseudo_window",
                    f"expected 1 <= {{pseudo_window}} <= min({{unimodal_epochs}}={train.unimodal_epochs}, "
                    f"{MAX_WINDOW}), got {train.pseudo_window}", refs=("pseudo_window", "unimodal_epochs"),
                )

    @property
    def uses_pseudo_labels(self) -> bool:
        """Whether stage 1 runs: methods ``umi`` / ``pooled`` with ``use_pseudo``."""
        return self.method in ("umi", "pooled") and self.model.use_pseudo

    @classmethod
    def specs(cls) -> dict[str, list[OptionSpec]]:
        """Every option by concern: ``{"method": [...], "model": [...], "train": [...], "runtime": [...]}``."""
        return {"method": list(option_specs(cls)), **{name: list(option_specs(c)) for name, c in CONCERNS.items()}}

    @classmethod
    def from_options(cls, config: Optional["FitConfig"] = None, **options: Any) -> "FitConfig":
        """A config from flat options (any field of any concern, by name), over ``config``.

        Raises:
            InvalidArgument: an unknown option, or a bad value (naming the option).
        """
        base = config or cls()
        owner = {spec.name: concern for concern, specs in cls.specs().items() for spec in specs}
        unknown = sorted(set(options) - set(owner))
        if unknown:
            raise InvalidArgument(unknown[0], f"unknown options {unknown}; expected some of {sorted(owner)}")
        by_concern: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            by_concern.setdefault(owner[name], {})[name] = value
        changes: dict[str, Any] = dict(by_concern.pop("method", {}))
        for concern, values in by_concern.items():
            changes[concern] = getattr(base, concern).replace(**values)
        return base.replace(**changes)

    def options(self) -> dict[str, Any]:
        """Every option by its name, flat (the keyword arguments of :meth:`from_options`)."""
        flat = {spec.name: getattr(self, spec.name) for spec in option_specs(type(self))}
        for concern in CONCERNS:
            flat.update(getattr(self, concern).to_dict())
        return flat

    def result_options(self) -> dict[str, Any]:
        """The options that determine a run's result: all but :class:`RuntimeConfig`'s (the
        pseudo-label window as in effect: :meth:`TrainConfig.window`)."""
        runtime = {spec.name for spec in option_specs(RuntimeConfig)}
        options = {k: v for k, v in self.options().items() if k not in runtime}
        return {**options, "pseudo_window": self.train.window()}  # the window in effect, given or not
