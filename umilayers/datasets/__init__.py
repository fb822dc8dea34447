"""Adapters from real datasets' own formats to a FeatureStore."""

__all__: list[str] = []
