"""Training data: the built-in digits, latent shard datasets, image folders,
and the deterministic order in which a run reads them.

Every dataset returns dicts: `x` (the training target: pixels or latents,
float32 `[C, H, W]`), `y` (int64 class id), optionally `std` (the VAE
posterior's standard deviation, for `latent_sampling="sample"`) and `image`
(float32 `[3, H, W]` in [-1, 1], what a REPA feature encoder reads).

Latent datasets are folders written by `ddt_fast.training.extract_latents`:
`index.json` (classes, source files, shard list with each shard's rows,
size in bytes and sha256, extraction settings) and
`shards/shard_XXXXXX.safetensors`, each holding `latents` (and optionally
`std`) `[N, C, h, w]`, `labels`, `source` (index into the file list) and
`flip` (1 where the image was mirrored before encoding).

Integrity: `LatentDataset` checks every shard's presence, header and size
when it opens (a stat and a header read each) and its sha256 when it first
reads the shard's data (once per shard and process; the tensors then come
from a memory map, as before), so a damaged shard raises DatasetError naming
it before any item of it is used; `verify="open"` hashes every shard up
front instead. The fix is re-running `extract_latents` with the same
arguments on the same folder: it re-encodes the shards that fail their check.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ddt_fast._io import sha256_file

__all__ = [
    "DatasetError",
    "DigitsDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "SampleOrder",
    "StepBatches",
    "open_dataset",
    "INDEX_NAME",
    "IMAGE_EXTENSIONS",
    "center_crop",
    "load_image",
    "scan_image_folder",
    "files_digest",
    "read_index",
    "check_shard",
]

Tensor = torch.Tensor
INDEX_NAME = "index.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class DatasetError(RuntimeError):
    """A dataset is missing, empty or corrupt (the message names the file)."""


def _fix(root: str) -> str:
    return (
        f"re-run extract_latents with the same arguments and out_dir={root!r}: it re-encodes the shards that "
        "fail their check"
    )


# ---------------------------------------------------------------------------
# digits


class DigitsDataset(torch.utils.data.Dataset):
    """The 8x8 handwritten digits that ship with scikit-learn (1797 images,
    10 classes), in pixel space: `[1, 8, 8]` scaled from 0..16 to [-1, 1].
    Train a model with `in_channels=1`, `num_classes=10` and patch size 1 or 2."""

    num_classes = 10

    def __init__(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError(
                "the digits dataset comes with scikit-learn: pip install scikit-learn "
                "(or pip install 'ddt_fast[train]')"
            ) from e
        d = load_digits()
        self.x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
        self.y = torch.from_numpy(d.target.astype(np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i], "image": self.x[i]}

    @property
    def sample_shape(self):
        return tuple(self.x.shape[1:])

    def digest(self) -> str:
        """SHA-256 of the images and labels (what a run records of its data)."""
        h = hashlib.sha256(b"digits\n")
        for t in (self.x, self.y):
            h.update(f"{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------
# images


def center_crop(image, resolution: int):
    """ADM's center crop: halve with a box filter while the short side is at
    least twice `resolution`, resize (bicubic) so the short side is
    `resolution`, then cut the central `resolution x resolution` square."""
    from PIL import Image

    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def load_image(path: str, resolution: int, flip: bool = False) -> Tensor:
    """An RGB image file as float32 `[3, R, R]` in [-1, 1], center-cropped, optionally mirrored."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = center_crop(im.convert("RGB"), resolution)
    except (OSError, ValueError) as e:
        raise DatasetError(f"could not read image {path}: {e}") from e
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0
    return x.flip(-1) if flip else x


def scan_image_folder(root: str) -> tuple:
    """`(classes, files, labels)` of an ImageFolder-style tree `root/<class>/<image>`
    (classes sorted by name, files sorted within a class, paths relative to root)."""
    if not os.path.isdir(root):
        raise DatasetError(f"image folder not found: {root} (expected root/<class name>/<image files>)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, cls))):
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, name), root))
                    labels.append(label)
    if not files:
        raise DatasetError(
            f"no images under {root}: expected root/<class name>/<image files> with one of "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    return classes, files, labels


def files_digest(root: str, files: Sequence[str]) -> str:
    """SHA-256 of a file list: each relative path and its size in bytes, in
    order (a stat per file; contents are not read)."""
    h = hashlib.sha256()
    for name in files:
        try:
            size = os.path.getsize(os.path.join(root, name))
        except OSError as e:
            raise DatasetError(f"could not read image {os.path.join(root, name)}: {e}") from e
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of an ImageFolder-style tree, center-cropped to `resolution`:
    `{"x": image, "y": label, "image": image}` with images in [-1, 1].
    `items` (pairs of file index and flip flag) selects and orders the images;
    by default every file once, unflipped."""

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        items: Optional[Sequence] = None,
        files: Optional[List[str]] = None,
        labels: Optional[List[int]] = None,
    ):
        self.root, self.resolution = root, resolution
        if files is None:
            self.classes, self.files, self.labels = scan_image_folder(root)
        else:
            self.classes, self.files, self.labels = None, list(files), list(labels)
        self.items = list(items) if items is not None else [(i, False) for i in range(len(self.files))]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, src: int, flip: bool = False) -> Tensor:
        """File `src` of the tree as float32 `[3, R, R]` in [-1, 1]."""
        return load_image(os.path.join(self.root, self.files[src]), self.resolution, flip)

    def image(self, i: int) -> Tensor:
        src, flip = self.items[i]
        return self.load(src, bool(flip))

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        img = self.image(i)
        return {"x": img, "y": torch.tensor(self.labels[self.items[i][0]]), "image": img}


# ---------------------------------------------------------------------------
# latent shards


def read_index(root: str) -> dict:
    path = os.path.join(root, INDEX_NAME)
    if not os.path.isdir(root):
        raise DatasetError(
            f"dataset folder not found: {root} (pass data='digits' or a folder written by extract_latents)"
        )
    if not os.path.exists(path):
        raise DatasetError(
            f"{root} has no {INDEX_NAME}: it is not a finished latent dataset. Run "
            "extract_latents(image_folder, out_dir=...) (again, to finish it) first"
        )
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"could not read {path}: {e} (re-run extract_latents to rewrite it)") from e
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DatasetError(f"{path} is not a latent dataset index (no 'shards' list)")
    return index


def check_shard(
    path: str, expected: Optional[int] = None, size: Optional[int] = None, root: Optional[str] = None
) -> int:
    """Rows in a latent shard, or DatasetError naming the file and the
    problem: missing, empty, not a readable safetensors file, lacking
    tensors, of another `size` in bytes or other row count than `expected`.
    Reads the header only (the data is checked by its sha256, see
    `LatentDataset`). `root`: the dataset folder, for the fix in messages."""
    from safetensors import SafetensorError, safe_open

    fix = _fix(root if root is not None else os.path.dirname(os.path.dirname(path)))
    if not os.path.exists(path):
        raise DatasetError(f"latent shard missing: {path} ({fix})")
    actual = os.path.getsize(path)
    if actual == 0:
        raise DatasetError(f"latent shard is empty: {path} ({fix})")
    if size is not None and actual != size:
        raise DatasetError(
            f"latent shard is corrupt: {path} ({actual} bytes, the index says {size}: truncated or "
            f"damaged after extraction); {fix}"
        )
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            need = {"latents", "labels", "source", "flip"}
            if not need <= keys:
                raise DatasetError(f"latent shard {path} lacks {sorted(need - keys)} ({fix})")
            n = f.get_slice("latents").get_shape()[0]
            if any(f.get_slice(k).get_shape()[0] != n for k in need | ({"std"} & keys)):
                raise DatasetError(f"latent shard {path}: its tensors hold different numbers of rows ({fix})")
    except (SafetensorError, OSError, ValueError) as e:
        raise DatasetError(f"latent shard is corrupt: {path} ({e}); {fix}") from e
    if n == 0:
        raise DatasetError(f"latent shard holds no rows: {path} ({fix})")
    if expected is not None and n != expected:
        raise DatasetError(f"latent shard {path} holds {n} rows, the index says {expected}; {fix}")
    return n


class LatentDataset(torch.utils.data.Dataset):
    """Latents from an `extract_latents` folder. Every shard's presence,
    header, row count and size are checked when the dataset is opened (before
    any training starts); its sha256 when its data is first read in this
    process (`verify="read"`, the default: one sequential read of the shard,
    about 15 ms per 16 MB shard, once per shard and process), or for every
    shard right away (`verify="open"`: one extra read of the whole dataset).
    A shard that fails raises DatasetError naming it and the fix. Indexes
    written before checksums were recorded are checked for presence, header
    and rows only. With `image_folder` (the tree the latents came from),
    each item also carries its source image, center-cropped and mirrored like
    the latent, for REPA."""

    def __init__(self, root: str, image_folder: Optional[str] = None, in_memory: bool = True, verify: str = "read"):
        if verify not in ("read", "open"):
            raise ValueError(f"verify must be 'read' or 'open', got {verify!r}")
        self.root = root
        self.index = read_index(root)
        entries = self.index["shards"]
        self.shards = [os.path.join(root, s["file"]) for s in entries]
        if not self.shards:
            raise DatasetError(f"{os.path.join(root, INDEX_NAME)} lists no shards: the dataset is empty")
        counts = [check_shard(p, s.get("num"), s.get("bytes"), root) for p, s in zip(self.shards, entries)]
        self._sha256 = [s.get("sha256") for s in entries]
        self._verified: set = set()
        if verify == "open":
            for k in range(len(self.shards)):
                self._verify(k)
        self.offsets = np.cumsum([0] + counts)
        self.num_classes = len(self.index.get("classes", [])) or None
        self._data: Dict[int, Dict[str, Tensor]] = {}
        self.in_memory = in_memory
        self.images = None
        if image_folder is not None:
            files, labels = self.index.get("files"), self.index.get("labels")
            if files is None or labels is None:
                raise DatasetError(
                    f"{root}/{INDEX_NAME} does not list its source files; re-extract it to pair latents with images"
                )
            first = os.path.join(image_folder, files[0])
            if not os.path.exists(first):
                raise DatasetError(
                    f"image folder {image_folder} does not hold the images these latents came "
                    f"from (missing {first}); pass the folder given to extract_latents"
                )
            self.images = ImageFolderDataset(image_folder, int(self.index["resolution"]), files=files, labels=labels)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sample_shape(self):
        return tuple(self._shard(0)["latents"].shape[1:])

    @property
    def has_std(self) -> bool:
        return "std" in self._shard(0)

    def digest(self) -> str:
        """SHA-256 of index.json without the per-shard checksums and sizes:
        the extraction settings (VAE weights digest, input files digest),
        classes, files and shard layout. What a training run records of its
        data: equal for a re-extraction that repaired shards, different for
        other images, another VAE or other settings."""
        index = dict(
            self.index,
            shards=[{k: v for k, v in s.items() if k not in ("sha256", "bytes")} for s in self.index["shards"]],
        )
        return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()

    def _verify(self, k: int) -> None:
        """Check shard `k` against the sha256 the index records (once per process)."""
        expected = self._sha256[k]
        if expected is None or k in self._verified:
            return
        try:
            actual = sha256_file(self.shards[k])
        except OSError as e:
            raise DatasetError(f"could not read latent shard {self.shards[k]}: {e}") from e
        if actual != expected:
            raise DatasetError(
                f"latent shard {self.shards[k]} fails its checksum (sha256 {actual[:16]}..., "
                f"{INDEX_NAME} says {expected[:16]}...): it was damaged after extraction; "
                f"{_fix(self.root)}"
            )
        self._verified.add(k)

    def _shard(self, k: int) -> Dict[str, Tensor]:
        if k not in self._data:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            # one sequential read to hash, then the memory map the tensors use (pages
            # shared with the page cache and with every other process reading the shard)
            self._verify(k)
            try:
                data = load_file(self.shards[k])
            except (SafetensorError, OSError, ValueError) as e:
                raise DatasetError(f"latent shard is corrupt: {self.shards[k]} ({e}); {_fix(self.root)}") from e
            if not self.in_memory:
                self._data.clear()
            self._data[k] = data
        return self._data[k]

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        shard, j = self._shard(k), i - int(self.offsets[k])
        item = {"x": shard["latents"][j].float(), "y": shard["labels"][j].long()}
        if "std" in shard:
            item["std"] = shard["std"][j].float()
        if self.images is not None:
            item["image"] = self.images.load(int(shard["source"][j]), bool(shard["flip"][j]))
        return item


def open_dataset(data: str, image_folder: Optional[str] = None):
    """The dataset a `TrainConfig.data` names: "digits" or a latent folder."""
    if data == "digits":
        return DigitsDataset()
    return LatentDataset(data, image_folder=image_folder)


# ---------------------------------------------------------------------------
# order


class SampleOrder:
    """The run's fixed order of samples: epoch e is the permutation
    `randperm(n)` drawn from a generator seeded by `(seed, e)`; the stream is
    the epochs one after another. A position in the stream (samples consumed)
    is all the data state a checkpoint needs."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise DatasetError("the dataset is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, start: int, count: int) -> List[int]:
        """Dataset indices of stream positions `start .. start + count - 1`."""
        out = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.n)
            take = min(count - len(out), self.n - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
            pos += take
        return out


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches, step after step from `start_step`: step s
    covers stream positions `[s * G, (s + 1) * G)` of the global batch G;
    process r takes its contiguous `G / world` part, cut into `grad_accum`
    micro-batches. Used as a DataLoader `batch_sampler`."""

    def __init__(
        self,
        order: SampleOrder,
        global_batch: int,
        rank: int,
        world: int,
        grad_accum: int,
        start_step: int,
        end_step: int,
    ):
        self.order, self.G, self.rank, self.world, self.accum = order, global_batch, rank, world, grad_accum
        self.start_step, self.end_step = start_step, end_step
        self.micro = global_batch // (world * grad_accum)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        per_rank = self.G // self.world
        for step in range(self.start_step, self.end_step):
            idx = self.order.indices(step * self.G + self.rank * per_rank, per_rank)
            for m in range(self.accum):
                yield idx[m * self.micro : (m + 1) * self.micro]
