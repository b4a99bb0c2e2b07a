"""Image sources for the shard writer: one small reader per kind of input.

Every reader yields ``(key, image, meta)`` in a deterministic order (the same input always
gives the same sequence), where

* ``key`` is a WebDataset sample key: letters, digits, ``_`` and ``-`` only (WebDataset splits
  member names on ``.``, and the tar writer refuses ``/``), unique within the source;
* ``image`` is a uint8 array, ``(H, W)`` for grayscale or ``(H, W, 3)`` for RGB;
* ``meta`` is a JSON-serialisable dict: ``label`` (an int) when the source has labels, plus
  where the image came from (``file``, ``index``), so any sample can be traced back.

Kinds: ``folder`` (an image folder tree, optionally one subfolder per class), ``idx`` (MNIST /
Fashion-MNIST files), ``cifar`` (CIFAR-10/100 python batches), ``list`` (a text file of image
paths). ``open_source`` picks the reader for a path.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

Sample = tuple[str, np.ndarray, dict[str, Any]]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
KINDS = ("folder", "idx", "cifar", "list")
# Tar (USTAR) member names hold at most 100 characters; "<key>.json" and "<key>.webp" must fit.
MAX_KEY_LENGTH = 90
# PIL modes that hold one channel; everything else is converted to RGB.
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class SourceError(ValueError):
    """The input cannot be read as the kind of source it was taken for (a one-line message)."""


@dataclass
class Skipped:
    """Files a reader could not decode, so that the caller can report and count them."""

    files: list[str] = field(default_factory=list)

    def add(self, name: str, reason: Exception) -> None:
        log.warning("skipping unreadable image %s: %s", name, reason)
        self.files.append(name)


# --- keys ---------------------------------------------------------------------------------


def slug(text: str) -> str:
    """``"cat/IMG 001.jpg"`` -> ``"cat_IMG_001_jpg"``: a string usable as a sample key."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:MAX_KEY_LENGTH] or "_"


class UniqueKeys:
    """Turns names into distinct keys: two names can slug to the same key (``a b`` / ``a_b``,
    or after truncation), and two samples with one key would merge into one in WebDataset."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, name: str) -> str:
        base = key = slug(name)
        n = 1
        while key in self._used:
            n += 1
            key = f"{base[: MAX_KEY_LENGTH - 8]}_{n}"
        self._used.add(key)
        return key


# --- image files ----------------------------------------------------------------------------


def load_image_file(path: Path) -> np.ndarray:
    """An image file -> ``(H, W)`` uint8 if it is grayscale, else ``(H, W, 3)`` uint8 (alpha
    dropped, palettes expanded, EXIF rotation applied, first frame of an animation)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # a phone photo's pixels are often stored sideways
        image.load()  # decode now, so that a truncated file fails here and not later
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit (and 32-bit) images: scale 0..65535 to 0..255 rather than clip at 255.
            pixels = np.asarray(image, dtype=np.float64)
            scale = 1 / 257 if pixels.max() > 255 else 1.0
            return np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
        mode = "L" if image.mode in GRAY_MODES else "RGB"
        return np.asarray(image.convert(mode))


def _read_image_files(entries: list[tuple[Path, str, dict[str, Any]]], skipped: Skipped | None) -> Iterator[Sample]:
    """Decode each ``(path, name, meta)`` entry and yield it under a key made from ``name``; a
    file that fails to decode is skipped (and recorded in ``skipped``)."""
    skipped = Skipped() if skipped is None else skipped
    keys = UniqueKeys()
    for path, name, meta in entries:
        key = keys(name)  # taken before decoding, so a skipped file does not shift later keys
        try:
            image = load_image_file(path)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            skipped.add(name, error)
            continue
        yield key, image, meta


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` at any depth, sorted by their path relative to ``root``."""
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_image_folder(root: str | Path, skipped: Skipped | None = None) -> Iterator[Sample]:
    """Images found recursively under ``root``, in sorted path order.

    When every image sits inside a subfolder (``root/<class>/.../x.png``), the first subfolder is
    the class: ``meta = {"label": index in the sorted class names, "class": name, "file": ...}``.
    With any image directly in ``root``, there are no labels.
    """
    root = Path(root)
    paths = find_images(root)
    relative = [p.relative_to(root).as_posix() for p in paths]
    has_classes = bool(relative) and all("/" in r for r in relative)
    classes = sorted({r.split("/")[0] for r in relative}) if has_classes else []
    class_index = {name: i for i, name in enumerate(classes)}
    entries = []
    for index, (path, rel) in enumerate(zip(paths, relative)):
        meta: dict[str, Any] = {"file": rel, "index": index}
        if has_classes:
            class_name = rel.split("/")[0]
            meta.update({"label": class_index[class_name], "class": class_name})
        entries.append((path, rel, meta))
    yield from _read_image_files(entries, skipped)


def read_path_list(list_file: str | Path, skipped: Skipped | None = None) -> Iterator[Sample]:
    """Images named in a text file, one path per line, in the file's order. Relative paths are
    relative to the text file's folder; blank lines and lines starting with ``#`` are ignored."""
    list_file = Path(list_file)
    entries = []
    for line_number, line in enumerate(list_file.read_text().splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        meta = {"file": name, "line": line_number, "index": len(entries)}
        entries.append((list_file.parent / name, name, meta))  # an absolute name replaces the folder
    yield from _read_image_files(entries, skipped)


# --- idx (MNIST, Fashion-MNIST) -------------------------------------------------------------

# The third byte of an idx file's magic number says the element type; all are big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_array(path: str | Path) -> np.ndarray:
    """An idx or idx.gz file -> its array: ``(N, H, W)`` for images, ``(N,)`` for labels.

    Layout: magic (two zero bytes, a type byte, the number of dimensions), one big-endian
    uint32 per dimension, then the elements in C order.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise SourceError(f"cannot read idx file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise SourceError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) != header + int(np.prod(shape)) * dtype.itemsize:
        raise SourceError(f"{path}: {len(data) - header} bytes of data do not fit the header's shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def idx_labels_path(images_path: str | Path) -> Path:
    """``train-images-idx3-ubyte.gz`` -> ``train-labels-idx1-ubyte.gz`` (in the same folder)."""
    images_path = Path(images_path)
    return images_path.with_name(images_path.name.replace("images", "labels").replace("idx3", "idx1"))


def read_idx(images: str | Path, labels: str | Path | None = None) -> Iterator[Sample]:
    """Images of an idx file, in file order; labels from ``labels`` or, when not given, from the
    labels file beside the images (if there is one). Keys are ``<prefix>_<index>``."""
    images = Path(images)
    pixels = read_idx_array(images)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
        raise SourceError(f"{images}: expected uint8 images (N, H, W), got {pixels.dtype} {pixels.shape}")
    label_file = Path(labels) if labels is not None else idx_labels_path(images)
    label_values = None
    if label_file.exists() and label_file != images:
        label_values = read_idx_array(label_file)
        if label_values.shape != (len(pixels),):
            raise SourceError(f"{label_file} holds {label_values.shape} labels for {len(pixels)} images in {images}")
    elif labels is not None:
        raise SourceError(f"labels file {label_file} does not exist")
    else:
        log.warning("no labels file %s beside %s: writing images without labels", label_file.name, images.name)
    prefix = slug(images.name.split("-images")[0].split(".")[0])
    width = max(6, len(str(len(pixels) - 1)))
    for index in range(len(pixels)):
        meta: dict[str, Any] = {"file": images.name, "index": index}
        if label_values is not None:
            meta["label"] = int(label_values[index])
        yield f"{prefix}_{index:0{width}d}", pixels[index], meta


# --- CIFAR ----------------------------------------------------------------------------------


def _numpy_global(*candidates: str):
    """The first of ``module.name`` candidates that imports (numpy 2 moved numpy.core to
    numpy._core; importing the old name warns)."""
    import importlib

    for candidate in candidates:
        module, _, name = candidate.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} exists in this numpy")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and nothing else.

    A pickle can name any global (``os.system``...) and call it while loading, so loading a
    downloaded pickle with the stock unpickler runs whatever it says. Here every global is
    looked up in an allow-list of the functions numpy's arrays are rebuilt with.
    """

    _RECONSTRUCT = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    _FROMBUFFER = ("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    # (module, name) as written in the pickle -> where to find it in the numpy installed here
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        # pickle protocol 5 rebuilds arrays from a buffer instead
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy", "ndarray"): ("numpy.ndarray",),
        ("numpy", "dtype"): ("numpy.dtype",),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle the global {module}.{name} (only numpy arrays)")
        return _numpy_global(*self.ALLOWED[(module, name)])


def load_numpy_pickle(path: str | Path) -> Any:
    """A pickle of containers and numpy arrays (such as a CIFAR batch) -> its object. CIFAR was
    pickled by Python 2, whose strings come back as ``bytes`` (so its keys are ``b"data"``)."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f, encoding="bytes").load()


def _get(batch: dict, name: str, default: Any = None) -> Any:
    """``batch[b"name"]`` or ``batch["name"]``: Python-3 pickles may have str keys."""
    return batch.get(name.encode(), batch.get(name, default))


def cifar_batch_files(path: str | Path) -> list[Path]:
    """A batch file -> itself; a ``cifar-10-batches-py`` folder -> its training batches
    ``data_batch_1..5``; a ``cifar-100-python`` folder -> its ``train`` file."""
    path = Path(path)
    if path.is_file():
        return [path]
    batches = _cifar10_training_batches(path)
    if batches:
        return batches
    if (path / "train").is_file():
        return [path / "train"]
    raise SourceError(f"{path} holds no CIFAR batches (data_batch_1.. or train)")


def _cifar10_training_batches(folder: Path) -> list[Path]:
    """``data_batch_1``, ``data_batch_2``... in a folder, in numeric order (``_2`` before ``_10``)."""
    batches = [p for p in folder.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)]
    return sorted(batches, key=lambda p: int(p.name.rsplit("_", 1)[-1]))


def cifar_class_names(folder: Path) -> list[str] | None:
    """Class names from ``batches.meta`` (CIFAR-10) or ``meta`` (CIFAR-100), if present."""
    for meta_name, field_name in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        if (folder / meta_name).is_file():
            names = _get(load_numpy_pickle(folder / meta_name), field_name)
            if names is not None:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return None


def cifar_images(batch: dict, path: Path) -> np.ndarray:
    """A batch's ``data`` (N, 3072), each row the 1024 red, then green, then blue values of a
    32x32 image in row order -> ``(N, 32, 32, 3)`` uint8."""
    data = np.asarray(_get(batch, "data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SourceError(f"{path}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar(path: str | Path) -> Iterator[Sample]:
    """CIFAR-10/100 python batches, batch by batch in file order. ``label`` is the CIFAR-10
    label or the CIFAR-100 fine label (``coarse_label`` too when present)."""
    files = cifar_batch_files(path)
    class_names = cifar_class_names(files[0].parent)
    for file in files:
        try:
            batch = load_numpy_pickle(file)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise SourceError(f"cannot read CIFAR batch {file}: {error}") from None
        if not isinstance(batch, dict) or _get(batch, "data") is None:
            raise SourceError(f"{file} is not a CIFAR batch (no 'data' entry)")
        images = cifar_images(batch, file)
        labels = _get(batch, "labels", _get(batch, "fine_labels"))
        coarse = _get(batch, "coarse_labels")
        if labels is not None and len(labels) != len(images):
            raise SourceError(f"{file} holds {len(labels)} labels for {len(images)} images")
        prefix = slug(file.name)
        for index in range(len(images)):
            meta: dict[str, Any] = {"file": file.name, "index": index}
            if labels is not None:
                meta["label"] = int(labels[index])
                if class_names is not None and 0 <= meta["label"] < len(class_names):
                    meta["class"] = class_names[meta["label"]]
            if coarse is not None:
                meta["coarse_label"] = int(coarse[index])
            yield f"{prefix}_{index:05d}", np.ascontiguousarray(images[index]), meta


# --- choosing a reader ------------------------------------------------------------------------

CIFAR_FILE = re.compile(r"^(data_batch_\d+|test_batch|train|test)$")


def detect_kind(path: Path) -> str:
    """Guess the kind of a source from its name and type; raise SourceError when it is unclear."""
    if path.is_dir():
        has_cifar = bool(_cifar10_training_batches(path)) or ((path / "train").is_file() and (path / "meta").is_file())
        return "cifar" if has_cifar else "folder"
    name = path.name.lower()
    if "idx" in name or name.endswith(("-ubyte", "-ubyte.gz")):
        return "idx"
    if CIFAR_FILE.match(path.name):
        return "cifar"
    if name.endswith((".txt", ".lst", ".list")):
        return "list"
    raise SourceError(f"cannot tell what kind of source {path} is; pass --kind ({'|'.join(KINDS)})")


def open_source(
    path: str | Path, kind: str | None = None, labels: str | Path | None = None, skipped: Skipped | None = None
) -> tuple[str, Iterator[Sample]]:
    """``(kind, samples)`` for a source path; ``kind`` is guessed when not given. Unreadable
    image files (folder and list sources) are skipped and recorded in ``skipped``."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    kind = kind or detect_kind(path)
    if labels is not None and kind != "idx":
        raise SourceError(f"--labels applies to idx sources only, not to a {kind} source")
    if kind == "folder":
        if not path.is_dir():
            raise SourceError(f"an image folder source must be a directory: {path}")
        return kind, read_image_folder(path, skipped)
    if kind == "idx":
        return kind, read_idx(path, labels)
    if kind == "cifar":
        return kind, read_cifar(path)
    if kind == "list":
        if not path.is_file():
            raise SourceError(f"a list source must be a text file: {path}")
        return kind, read_path_list(path, skipped)
    raise SourceError(f"unknown source kind {kind!r}; expected one of {', '.join(KINDS)}")
