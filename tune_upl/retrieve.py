"""Retrieval pictures (the seed's `test.py`): a query image and its top-k among the test images of the
selected model's embedding database, each framed green when its class is the query's and red otherwise.

The database is the first final seed's `test_embeddings.pt` (protocol `val`), or under protocol `seed`
the selected trial's best checkpoint with the test split embedded once and kept beside `selection.json`
(`saved_models` finds them). The report's picture is drawn by the run itself when it ends (`draw_picture`).
A query is a path in the database (also a unique tail of one, e.g. `images/012.x/x_3.jpg`), or any image
file, which the model embeds first; its class is then looked up in the prepared dataset (unknown: grey).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from tune_upl.errors import DatasetError, ExperimentError
from tune_upl.layout import CHECKPOINT_FILE, EMBEDDINGS_FILE

GREEN, RED, GREY = (0, 255, 0), (255, 0, 0), (128, 128, 128)
FILE_SIZE, FILE_FRAME = 224, 8  # the saved pictures, as the seed's test.py saved them
TILE, FRAME, CAPTION, GAP, MARGIN = 128, 6, 20, 6, 8  # the grid


@dataclass
class Database:
    """Test embeddings (L2-normalised), labels 0..C-1 over the test classes in class-id order, image
    paths, and where they came from (the run's configuration and checkpoint, to embed new images)."""

    key: str
    embeddings: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    config: dict[str, Any]
    checkpoint: Path
    source: str


@dataclass(frozen=True)
class Hit:
    index: int
    similarity: float
    correct: Optional[bool]  # None: the query's class is unknown


@dataclass(frozen=True)
class Query:
    path: str
    label: Optional[int]  # a database label; -1: a known class that is not a test class; None: unknown
    embedding: torch.Tensor
    index: Optional[int]  # its place in the database, left out of its own results


# ---------------------------------------------------------------- the database
def load_database(experiment: Path, study: Optional[str] = None) -> Database:
    """The selected model's test database; under protocol seed the test split is embedded once, then kept."""
    from tune_upl.saved_models import final_checkpoint, pick_selection, selected_checkpoint, selected_source

    selection = pick_selection(experiment, study)
    found = final_checkpoint(experiment, selection, EMBEDDINGS_FILE)
    if found is not None:
        folder, config, source = found
        saved = torch.load(folder / EMBEDDINGS_FILE, map_location="cpu", weights_only=True)
    elif selection.get("test_selected"):
        folder, config = selected_checkpoint(experiment, selection), selection["config"]
        source = selected_source(selection)
        cached = experiment / selection["key"] / EMBEDDINGS_FILE
        if cached.is_file():
            saved = torch.load(cached, map_location="cpu", weights_only=True)
        else:
            saved = _embed_test_split(config, folder / CHECKPOINT_FILE)
            torch.save(saved, cached)
    else:
        raise ExperimentError(f"the final stage of study {selection['key']} has not saved a tested model yet")
    return as_database(saved, selection["key"], config, folder / CHECKPOINT_FILE, source)


def as_database(saved: dict[str, Any], key: str, config: dict[str, Any], checkpoint: Path, source: str) -> Database:
    """A saved test database (embeddings, labels, paths: `engine.Run.test_database`) ready to search."""
    embeddings = F.normalize(saved["embeddings"].float(), dim=-1)
    return Database(key, embeddings, saved["labels"].long(), list(saved["paths"]), config, checkpoint, source)


def _restored_run(config: dict[str, Any], state_file: Path) -> Any:
    """The run of `config` with the checkpoint's weights (no ImageNet download: the weights are replaced)."""
    from tune_upl.config import make_config
    from tune_upl.engine import build_run, load_state

    values = {**config, "pretrained": "none", "compile": False, "device": "auto", "inject_fault": "none"}
    run = build_run(make_config(values))
    run.load_state_dict(load_state(state_file))
    return run


def _embed_test_split(config: dict[str, Any], state_file: Path) -> dict[str, Any]:
    from tune_upl.data import ImageDataset, make_loader, run_transforms
    from tune_upl.engine import embed

    run = _restored_run(config, state_file)
    transform = run_transforms(run.cfg)[1]
    dataset = ImageDataset(run.splits.get("test", final=True), transform)
    embeddings, labels = embed(run, make_loader(dataset, run.cfg, train=False))
    return {"embeddings": embeddings.cpu(), "labels": labels.cpu(), "paths": [str(r.path) for r in dataset.records]}


# ---------------------------------------------------------------- queries
def locate(db: Database, query: str) -> Optional[int]:
    """The database index of a query path: the same file, or (not a file here) a unique tail of a path."""
    path = Path(query).expanduser()
    if path.is_file():
        resolved = path.resolve()
        return next((i for i, p in enumerate(db.paths) if Path(p).resolve() == resolved), None)
    tail = "/" + query.lstrip("/")
    matches = [i for i, p in enumerate(db.paths) if p == query or p.endswith(tail)]
    if len(matches) > 1:
        raise ExperimentError(f"--query_img_name {query} matches {len(matches)} test images, e.g. "
                              f"{db.paths[matches[0]]}; give more of its path")
    if not matches:
        raise FileNotFoundError(f"--query_img_name {query}: no such image file, nor a test image of {db.source}")
    return matches[0]


def _records_by_path(config: dict[str, Any]) -> dict[str, Any]:
    """The prepared dataset's records by source path ({} when it is not prepared on this machine)."""
    from tune_upl.config import make_config
    from tune_upl.data import load_records

    try:
        return {str(r.path): r for r in load_records(make_config(config))}
    except (DatasetError, FileNotFoundError, OSError):
        return {}


def query_label(db: Database, path: Path) -> Optional[int]:
    """The class of an image outside the database, as a database label (-1: a class outside the test
    classes, so every result is wrong), or None when the dataset does not list the image."""
    records = _records_by_path(db.config)
    record = records.get(str(path.resolve()))
    if record is None:
        return None
    test_ids = sorted({records[p].class_id for p in db.paths if p in records})
    return test_ids.index(record.class_id) if record.class_id in test_ids else -1


def embed_image(db: Database, path: Path) -> torch.Tensor:
    """An image file embedded by the database's model, as the test images were (eval transform)."""
    from tune_upl.data import run_transforms
    from tune_upl.engine import embed
    from tune_upl.prepare import decode_image_file

    run = _restored_run(db.config, db.checkpoint)
    try:
        image = decode_image_file(path)
    except (OSError, RuntimeError, ValueError) as error:
        raise ExperimentError(f"--query_img_name {path}: not a readable image ({error})") from None
    batch = run_transforms(run.cfg)[1](image).unsqueeze(0)
    embeddings, _ = embed(run, [(batch, torch.zeros(1, dtype=torch.long))])
    return F.normalize(embeddings[0].float().cpu(), dim=-1)


def make_query(db: Database, query: str) -> Query:
    index = locate(db, query)
    if index is not None:
        return Query(db.paths[index], int(db.labels[index]), db.embeddings[index], index)
    path = Path(query).expanduser().resolve()
    return Query(str(path), query_label(db, path), embed_image(db, path), None)


def search(db: Database, query: Query, k: int) -> list[Hit]:
    """The k most similar test images by cosine similarity, the query itself left out."""
    similarities = db.embeddings @ query.embedding
    if query.index is not None:
        similarities[query.index] = -float("inf")
    k = min(k, len(db.paths) - (query.index is not None))
    values, indices = similarities.topk(k)
    return [Hit(int(i), float(v), None if query.label is None else int(db.labels[i]) == query.label)
            for v, i in zip(values, indices)]


def fixed_queries(db: Database, count: int) -> list[int]:
    """`count` queries that do not change between reports: the first image of evenly spaced test classes."""
    classes = sorted(set(db.labels.tolist()))
    picks = [classes[round(i * (len(classes) - 1) / max(1, count - 1))] for i in range(min(count, len(classes)))]
    return [int((db.labels == c).nonzero()[0]) for c in dict.fromkeys(picks)]


# ---------------------------------------------------------------- pictures
def picture(path: str, records: Optional[dict[str, Any]] = None) -> Image.Image:
    """An image by its source path; where the original is gone, its pixels from the prepared cache."""
    if Path(path).is_file():
        with Image.open(path) as image:
            return image.convert("RGB")
    record = (records or {}).get(path)
    if record is None:
        raise FileNotFoundError(f"image {path} is gone and not in the prepared cache")
    from tune_upl.data import ImageDataset

    return Image.fromarray(ImageDataset([record], transform=None).read(0).permute(1, 2, 0).numpy())


def colour(correct: Optional[bool]) -> tuple[int, int, int]:
    return GREY if correct is None else GREEN if correct else RED


def framed(image: Image.Image, size: int, frame: int, outline: Optional[tuple[int, int, int]]) -> Image.Image:
    """A square crop resized to `size`, with a frame of `frame` px in `outline` (none for the query)."""
    tile = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    if outline is not None:
        ImageDraw.Draw(tile).rectangle((0, 0, size - 1, size - 1), outline=outline, width=frame)
    return tile


def tile_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of a tile in the grid: column 0 is the query, then the hits, a wider gap between."""
    x = MARGIN + column * (TILE + GAP) + (GAP * 2 if column else 0)
    return x, MARGIN + row * (TILE + CAPTION + GAP)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, OSError):  # an old Pillow or one without FreeType: the bitmap font
        return ImageFont.load_default()


def grid(rows: list[tuple[Image.Image, list[tuple[Image.Image, Hit]]]]) -> Image.Image:
    """One PNG-ready picture: a row per query, the query then its hits, similarity under each."""
    columns = 1 + max((len(hits) for _, hits in rows), default=0)
    width = tile_origin(0, columns - 1)[0] + TILE + MARGIN
    height = tile_origin(len(rows) - 1, 0)[1] + TILE + CAPTION + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font()
    for r, (query, hits) in enumerate(rows):
        cells = [(framed(query, TILE, FRAME, None), "query")]
        cells += [(framed(image, TILE, FRAME, colour(hit.correct)), f"{n}: {hit.similarity:.3f}")
                  for n, (image, hit) in enumerate(hits, 1)]
        for c, (tile, caption) in enumerate(cells):
            x, y = tile_origin(r, c)
            canvas.paste(tile, (x, y))
            draw.text((x + 2, y + TILE + 3), caption, fill=(0, 0, 0), font=font)
    return canvas


@dataclass(frozen=True)
class Retrieval:
    folder: Path
    grid: Path
    query: Query
    hits: list[Hit]


def save_retrieval(db: Database, query: Query, hits: list[Hit], folder: Path) -> Retrieval:
    """The seed's files (`query_img`, `retrieval_img_<rank>_<similarity>`, framed, as PNG so that the
    frame colours stay exact) and `grid.png`, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("retrieval_img_*.png"):  # an earlier retrieval of the same query
        old.unlink()
    records = None if all(Path(p).is_file() for p in [query.path, *(db.paths[h.index] for h in hits)]) \
        else _records_by_path(db.config)
    query_image = picture(query.path, records)
    framed(query_image, FILE_SIZE, FILE_FRAME, None).save(folder / "query_img.png")
    images = []
    for rank, hit in enumerate(hits, 1):
        image = picture(db.paths[hit.index], records)
        framed(image, FILE_SIZE, FILE_FRAME, colour(hit.correct)).save(
            folder / f"retrieval_img_{rank}_{hit.similarity:.4f}.png")
        images.append((image, hit))
    target = folder / "grid.png"
    grid([(query_image, images)]).save(target)
    return Retrieval(folder, target, query, hits)


def retrieve(experiment: Path, query: str, k: int, output: Path, study: Optional[str] = None) -> Retrieval:
    """The `retrieve` command: find or embed the query, search the test database, save the pictures."""
    if k < 1:
        raise ExperimentError(f"--retrieval_num {k}: allowed: 1 or more")
    db = load_database(experiment, study)
    found = make_query(db, query)
    return save_retrieval(db, found, search(db, found, k), output / Path(found.path).stem)


def draw_picture(db: Database, target: Path, records: Optional[dict[str, Any]] = None, queries: int = 3,
                 k: int = 8) -> list[str]:
    """The report's picture, drawn by the run that made `db` when it ends: fixed queries from the test
    database, one row each with its `k` nearest test images, in one PNG. `records`: the prepared images by
    source path, for sources no longer on disk. Returns the queries' paths."""
    rows, shown = [], []
    for index in fixed_queries(db, queries):
        query = Query(db.paths[index], int(db.labels[index]), db.embeddings[index], index)
        rows.append((picture(query.path, records),
                     [(picture(db.paths[h.index], records), h) for h in search(db, query, k)]))
        shown.append(query.path)
    grid(rows).save(target)
    return shown
