"""Training: the paper's two-stage recipe on a FeatureStore, evaluation, multi-process runs.

Not imported by ``import umilayers`` (the layers know nothing about training); ``umilayers.fit``
and ``umilayers.evaluate`` load it on first use, as does ``umilayers fit``.

- :mod:`umilayers.train.config`: :class:`FitConfig` and its concerns :class:`TrainConfig`,
  :class:`RuntimeConfig` (and :class:`~umilayers.model.ModelConfig`);
- :mod:`umilayers.train.run`: :func:`fit`, :func:`evaluate`, the run directory;
- :mod:`umilayers.train.compare`: :func:`compare`, umi against its baselines at the same budget;
- :mod:`umilayers.train.loop`: one step, one epoch, prediction and metrics;
- :mod:`umilayers.train.distributed`: process groups and a world-size-independent sampler;
- :mod:`umilayers.train.checkpoint`: random-number state and derived seeds.

Example::

    >>> from umilayers.train import FitConfig, fit
    >>> FitConfig.from_options(method="vanilla", fusion_depth=2).model.fusion_depth
    2
"""

from umilayers.model import ModelConfig
from umilayers.train.compare import compare
from umilayers.train.config import FitConfig, RuntimeConfig, TrainConfig
from umilayers.train.distributed import process_group
from umilayers.train.loop import Callback, FitEvent, metric_score
from umilayers.train.run import RunExistsError, evaluate, fit

__all__ = [
    "fit",
    "evaluate",
    "compare",
    "FitConfig",
    "ModelConfig",
    "TrainConfig",
    "RuntimeConfig",
    "FitEvent",
    "Callback",
    "RunExistsError",
    "metric_score",
    "process_group",
]
