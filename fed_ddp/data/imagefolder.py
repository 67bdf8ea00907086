"""User data in the diffusers/HF ``imagefolder`` layout: images plus ``metadata.jsonl`` lines of
``{"file_name": "0001.png", "text": "a caption", ...}`` (other names for those two with ``data.image_column`` /
``data.caption_column``). Any other field (e.g. ``label``) can drive partitioning through ``data.label_field``,
and ``data.client_column`` names the clients (``data.partition=natural``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fed_ddp.data.digits import CaptionedImages
from fed_ddp.errors import ConfigError
from fed_ddp.files import read_text

MAX_CAPTION = 10_000


def read_metadata(folder: str | Path, image_column: str = "file_name", caption_column: str = "text") -> list[dict]:
    """The metadata lines, each with ``_file`` (its image's path relative to the folder), ``_text`` (its caption)
    and ``_line``, from the columns ``data.image_column`` / ``data.caption_column`` name."""
    folder = Path(folder).expanduser()
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"{folder}: no metadata.jsonl (imagefolder layout: file_name, text)")
    rows = []
    try:
        text = read_text(meta, follow=True)
    except OSError as e:  # not UTF-8, too large: the file and line named
        raise ValueError(str(e)) from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or image_column not in row or caption_column not in row:
            raise ValueError(f"{meta}:{n}: each line needs {image_column!r} and {caption_column!r} "
                             f"(data.image_column, data.caption_column), got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        text, name = row[caption_column], row[image_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{meta}:{n}: {caption_column!r} must be a non-empty caption string, got {text!r}")
        if len(text) > MAX_CAPTION:
            raise ValueError(f"{meta}:{n}: {caption_column!r} is {len(text):,} characters: at most {MAX_CAPTION:,} "
                             "(the text encoder reads the first 77 tokens)")
        if isinstance(name, str) and (Path(name).is_absolute() or ".." in Path(name).parts or not name.strip()):
            raise ValueError(f"{meta}:{n}: image {name!r} is outside the data folder: {image_column} must be a path "
                             "relative to it, without '..'")
        if not isinstance(name, str) or not (folder / name).is_file():
            raise FileNotFoundError(f"{meta}:{n}: image {name!r} does not exist")
        rows.append({**row, "_file": name, "_text": text, "_line": n})
    if not rows:
        raise ValueError(f"{meta}: no images listed")
    return rows


def require_field(rows: list[dict], name: str, key: str, meta: Path) -> None:
    """Every metadata line has the field ``name`` (what ``key`` names); else one line: the fields there are, or the
    first line without it."""
    lacking = [row["_line"] for row in rows if name not in row]
    if len(lacking) == len(rows):
        fields = sorted({k for row in rows for k in row if not k.startswith("_")})
        raise ConfigError(key, name, f"no line of {meta} has it (fields: {', '.join(fields)})")
    if lacking:
        raise ConfigError(key, name, f"{meta}:{lacking[0]} lacks it ({len(lacking)} of {len(rows)} lines do)")


def load_imagefolder(folder: str | Path, resolution: int, channels: int = 3, label_field: str = "text",
                     label_names: list[str] | None = None, image_column: str = "file_name",
                     caption_column: str = "text", rows: list[dict] | None = None) -> CaptionedImages:
    """Load, centre-crop and resize every listed image to ``resolution``, scaled to [-1, 1]. ``rows``: the folder's
    ``read_metadata``, where the caller has read it already."""
    folder = Path(folder).expanduser()
    rows = rows if rows is not None else read_metadata(folder, image_column, caption_column)
    meta = folder / "metadata.jsonl"
    if label_field != "text":  # the field partitioning reads
        require_field(rows, label_field, "data.label_field", meta)
    mode = "L" if channels == 1 else "RGB"
    pics = []
    for row in rows:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit, not ours
                im = Image.open(folder / row["_file"]).convert(mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{meta}:{row['_line']}: image {row['_file']!r} is refused by PIL's decompression-"
                             f"bomb limit ({' '.join(str(e).split())[:120]})") from None
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{folder / 'metadata.jsonl'}:{row['_line']}: image {row['_file']!r} does not "
                             f"decode ({type(e).__name__})") from None
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        pics.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    values = [str(row["_text"] if label_field == "text" else row.get(label_field, "")) for row in rows]
    names = label_names or sorted(set(values))
    labels = np.array([names.index(v) if v in names else -1 for v in values], dtype=np.int64)
    return CaptionedImages(torch.from_numpy(np.stack(pics)), [row["_text"] for row in rows], labels)
