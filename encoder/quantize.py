"""Numeric features as percentile buckets 1..100.

Causal LMs read raw numbers poorly (digit tokenisation breaks magnitude and
order), so the prompts write each numeric feature as its percentile bucket
inside special tokens, e.g. `<num>37</num>` (arXiv 2510.14223). This module
holds the fitted cut points: 99 per feature, splitting values into 100 buckets.
Pure: numpy only, no logging, no I/O beyond save/load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

N_BUCKETS = 100
_PERCENTILES = np.arange(1, N_BUCKETS)  # 1..99 -> 99 cut points
FORMAT_VERSION = 1


class FeatureQuantizer:
    """Percentile cut points per feature name; immutable once built."""

    def __init__(self, cut_points: Mapping[str, Sequence[float]]) -> None:
        cuts: dict[str, np.ndarray] = {}
        for name, points in cut_points.items():
            arr = np.asarray(points, dtype=np.float64)
            if arr.shape != (N_BUCKETS - 1,):
                raise ValueError(f"{name}: need {N_BUCKETS - 1} cut points, got {arr.shape}")
            if not np.all(np.isfinite(arr)) or np.any(np.diff(arr) < 0):
                raise ValueError(f"{name}: cut points must be finite and non-decreasing")
            arr.setflags(write=False)
            cuts[str(name)] = arr
        self._cuts = cuts

    @classmethod
    def fit(cls, values: Mapping[str, Sequence[float]]) -> "FeatureQuantizer":
        """Fit cut points from observed values per feature; non-finite values are ignored."""
        cuts = {}
        for name, seq in values.items():
            arr = np.asarray(seq, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size == 0:
                raise ValueError(f"feature {name!r} has no finite values to fit")
            cuts[name] = np.percentile(arr, _PERCENTILES)
        return cls(cuts)

    @property
    def names(self) -> list[str]:
        return sorted(self._cuts)

    def __contains__(self, name: object) -> bool:
        return name in self._cuts

    def bucket(self, name: str, value: float) -> int | None:
        """Percentile bucket 1..100 of value; None for an unfitted name or a non-finite value.

        Where cut points tie (a value shared by many items, e.g. a count of 1),
        the value gets the middle of the tied range, i.e. its mid-rank
        percentile, rather than the bottom or the top of it.
        """
        cuts = self._cuts.get(name)
        if cuts is None or not math.isfinite(value):
            return None
        below = int(np.searchsorted(cuts, value, side="left"))
        at_or_below = int(np.searchsorted(cuts, value, side="right"))
        return 1 + (below + at_or_below) // 2

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureQuantizer):
            return NotImplemented
        return self._cuts.keys() == other._cuts.keys() and all(
            np.array_equal(c, other._cuts[n]) for n, c in self._cuts.items()
        )

    def __repr__(self) -> str:
        return f"FeatureQuantizer(names={self.names})"

    # ------------------------------------------------------------ serialisation

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "cut_points": {name: self._cuts[name].tolist() for name in self.names},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "FeatureQuantizer":
        version = obj.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported quantizer format version {version}")
        return cls(obj["cut_points"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "FeatureQuantizer":
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
