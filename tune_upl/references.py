"""Published benchmark numbers (`references.yaml`) and their sources, looked up by dataset, backbone, loss
and feature dimension for the report's tables."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

REFERENCES_FILE = Path(__file__).with_name("references.yaml")


@dataclass(frozen=True)
class Source:
    key: str
    label: str  # short, for table cells
    title: str
    where: str
    note: str


@dataclass(frozen=True)
class Reference:
    """One published row: Recall@K in percent for a dataset, backbone, loss and dimension."""

    source: str
    data: str
    backbone: str
    loss: str
    dim: int
    recall: dict[int, float]


@dataclass(frozen=True)
class References:
    sources: dict[str, Source]
    results: tuple[Reference, ...]

    def find(self, data: str, backbone: str, loss: str, dim: int) -> Optional[Reference]:
        """The first listed reference for exactly this dataset, backbone, loss and dimension."""
        return next((r for r in self.results
                     if (r.data, r.backbone, r.loss, r.dim) == (data, backbone, loss, int(dim))), None)


@functools.lru_cache(maxsize=None)
def load_references(path: Path = REFERENCES_FILE) -> References:
    raw = yaml.safe_load(path.read_text())
    sources = {key: Source(key, s["label"], s["title"], s["where"], s.get("note", ""))
               for key, s in raw["sources"].items()}
    results = []
    for row in raw["results"]:
        if row["source"] not in sources:
            raise ValueError(f"{path}: result {row} names an unknown source {row['source']!r}")
        results.append(Reference(row["source"], row["data"], row["backbone"], row["loss"], int(row["dim"]),
                                 {int(k): float(v) for k, v in row["recall"].items()}))
    return References(sources, tuple(results))
