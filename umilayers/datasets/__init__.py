"""Adapters from the real datasets' own formats to a :class:`~umilayers.data.store.FeatureStore`.

Each dataset lives in its own submodule, imported on demand (the extractors need optional
extras such as ``umilayers[vision]``, ``umilayers[audio]`` and ``umilayers[datasets]``)::

    from umilayers.datasets import epic, msrvtt, robot

``checkpoints`` converts the paper's EPIC-Kitchens backbones (AST, Video Swin / Omnivore
Swin-T) from their original checkpoints to the timm / torchvision models the extractors run.
"""

__all__: list[str] = []
