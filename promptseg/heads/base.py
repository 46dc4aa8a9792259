"""`Head`: the base of every decoder head; it states the feature kind it needs.

A head is built from the `FeatureInfo` of the backbone it is plugged into plus its own config
(zoo.yaml `head:` entry), so the same head runs on any backbone that provides that kind.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..contracts import FeatureInfo

__all__ = ["Head"]


class Head(nn.Module):
    """Decoder head: backbone features (+ prompt embeddings, batched) -> logits / queries."""

    needs: ClassVar[str] = ""

    @classmethod
    def from_features(cls, features: FeatureInfo, **config: Any) -> Head:
        """Build for a backbone's features (a head with other needs maps them in an override)."""
        return cls(features, **config)
