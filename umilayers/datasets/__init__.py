"""Adapters from the real datasets' own formats to a :class:`~umilayers.data.store.FeatureStore`.

Each dataset lives in its own submodule, imported on demand (the extractors need optional
extras such as ``umilayers[vision]`` and ``umilayers[audio]``)::

    from umilayers.datasets import epic
"""

__all__: list[str] = []
