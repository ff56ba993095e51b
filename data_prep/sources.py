"""Where images come from: each source streams (split, name, label, read) records in a fixed order.

A record's `read()` returns the file's bytes (or a uint8 pixel array for torchvision sets) and
must be called before the next record is pulled: archives are read as streams, never extracted.
Splits are "train" and "val"; a set's official test split is stored as "val" (CIFAR-10,
Fashion-MNIST), which `Source.split_origin` records. ILSVRC-2010 has a labelled "test" as well.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import inspect
import io
import os
import pickle
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

SPLITS = ("train", "val")
ILSVRC2012_COUNTS = {"train": 1_281_167, "val": 50_000}       # the official archives
TINY_IMAGENET_COUNTS = {"train": 100_000, "val": 10_000}
CIFAR10_COUNTS = {"train": 50_000, "val": 10_000}
FASHION_MNIST_COUNTS = {"train": 60_000, "val": 10_000}        # official; shared/ holds a part
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")    # official label order (= sorted)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ClassInfo:
    index: int
    id: str      # wnid or class name
    name: str    # human-readable
    ilsvrc_id: int | None = None  # the challenge's own 1-based ILSVRC20xx_ID (its submission format)


@dataclass(frozen=True)
class Record:
    split: str
    name: str                                   # the file's name inside its source
    label: int                                  # class index; -1 when skip is set
    read: Callable[[], bytes | np.ndarray]
    skip: str | None = None                     # set when the source already knows it cannot be used


@dataclass
class Source:
    dataset: str
    classes: list[ClassInfo]
    records: Callable[[str], Iterator[Record]]  # split → records, same order on every call
    native_size: int | None                     # S for sets of S×S images with S < 256, stored unscaled
    expected_counts: dict[str, int] | None
    files: list[Path]                           # source files whose sha256 goes into the manifest
    split_origin: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val"})
    notes: list[str] = field(default_factory=list)
    splits: tuple[str, ...] = SPLITS              # the splits written, in order


def with_holdout(source: Source, n: int) -> Source:
    """A validation split carved out of the training images: the first `n` of each class (in the
    source's order) become `val`, the rest stay `train`, and the source's own val/test split is
    kept as `test`. For sets whose labelled test split should stay untouched while training is
    tuned on held-out images (e.g. Fashion-MNIST, as the d2l tutorial's setting needs)."""
    if n < 1:
        raise ValueError(f"holdout must be >= 1, got {n}")
    if "test" in source.splits:  # e.g. ILSVRC-2010: its own val would replace its labelled test
        raise ValueError(f"--holdout: {source.dataset} already has a labelled test split beside its "
                         "val split; prepare it without --holdout")

    def records(split: str) -> Iterator[Record]:
        if split == "test":
            yield from (dataclasses.replace(r, split="test") for r in source.records("val"))
            return
        seen: dict[int, int] = {}
        for r in source.records("train"):
            if r.skip is not None:  # listed once, with the training split
                if split == "train":
                    yield r
                continue
            seen[r.label] = seen.get(r.label, 0) + 1
            if (seen[r.label] <= n) == (split == "val"):
                yield dataclasses.replace(r, split=split)

    return dataclasses.replace(
        source, records=records, splits=("train", "val", "test"), expected_counts=None,
        split_origin={"train": f"train, less the first {n} images of each class",
                      "val": f"train, the first {n} images of each class (held out)",
                      "test": source.split_origin.get("val", "val")},
        notes=[*source.notes, f"--holdout {n}: val is held out from train; the source's "
                              f"{source.split_origin.get('val', 'val')} split is stored as test"])


class SourceError(Exception):
    """The given path does not hold the layout this source expects."""


def _no_read() -> bytes:
    return b""


def _skip(split: str, name: str, reason: str) -> Record:
    return Record(split, name, -1, _no_read, skip=reason)


def _classes(ids: list[str], names: dict[str, str] | None = None,
             ilsvrc_ids: dict[str, int] | None = None) -> list[ClassInfo]:
    """Class index = position of the id in sorted order (torchvision's and Caffe's convention)."""
    names, ilsvrc_ids = names or {}, ilsvrc_ids or {}
    return [ClassInfo(i, c, names.get(c, c), ilsvrc_ids.get(c)) for i, c in enumerate(sorted(ids))]


def _member(tar: tarfile.TarFile, suffix: str) -> bytes:
    for m in tar.getmembers():
        if m.isfile() and m.name.endswith(suffix):
            return tar.extractfile(m).read()
    raise SourceError(f"{tar.name}: no member ending in {suffix!r}")


# ---------------------------------------------------------------- ILSVRC-2012 -----------------

def read_devkit(path: Path, year: int = 2012) -> tuple[dict[int, tuple[str, str]], list[int]]:
    """ILSVRC{year}'s devkit → ({ILSVRC{year}_ID: (wnid, words)} for the challenge's leaf
    classes, the val images' ids in file-name order).

    meta.mat is MATLAB v5; read with scipy.io.loadmat, as torchvision's ImageNet dataset does.
    Leaves: for 2012 the ids 1..1000 (higher ids are inner WordNet nodes); for 2010 the
    synsets with num_children == 0. Ids are kept as the devkit gives them: the class index
    comes from the sorted wnids, never from id − 1.
    """
    import scipy.io  # only these sources need it
    with tarfile.open(path, "r:*") as tar:
        meta = _member(tar, "data/meta.mat")
        truth = _member(tar, f"data/ILSVRC{year}_validation_ground_truth.txt")
    mat = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True, struct_as_record=False)
    leaves = {}
    for s in np.atleast_1d(mat["synsets"]):
        sid = int(getattr(s, f"ILSVRC{year}_ID"))
        if (1 <= sid <= 1000) if year == 2012 else int(s.num_children) == 0:
            leaves[sid] = (str(s.WNID), str(s.words))
    return leaves, [int(line) for line in truth.decode().split()]


def ilsvrc2012(root: Path) -> Source:
    """The official archives in `root`, or an extracted train/<wnid>/ + val/<wnid>/ tree."""
    train_tar, val_tar = root / "ILSVRC2012_img_train.tar", root / "ILSVRC2012_img_val.tar"
    devkit = root / "ILSVRC2012_devkit_t12.tar.gz"
    if train_tar.is_file() and val_tar.is_file() and devkit.is_file():
        return _ilsvrc_archives(train_tar, val_tar, devkit)
    if (root / "train").is_dir():
        return _ilsvrc_tree(root, devkit)
    raise SourceError(f"{root}: expected ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                      "ILSVRC2012_devkit_t12.tar.gz, or an extracted train/<wnid>/ tree")


def _ilsvrc_archives(train_tar: Path, val_tar: Path, devkit: Path) -> Source:
    leaves, val_ids = read_devkit(devkit)
    classes = _classes([w for w, _ in leaves.values()], {w: n for w, n in leaves.values()},
                       {w: sid for sid, (w, _) in leaves.items()})
    index = {c.id: c.index for c in classes}
    id_to_index = {sid: index[w] for sid, (w, _) in leaves.items()}

    def val() -> Iterator[Record]:
        with tarfile.open(val_tar, "r:*") as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if not m.isfile():
                    continue
                yield _val_record(m.name, lambda m=m: tar.extractfile(m).read(), val_ids, id_to_index)

    return Source("ilsvrc2012", classes,
                  lambda s: _train_tar_records(train_tar, index) if s == "train" else val(), None,
                  dict(ILSVRC2012_COUNTS), [train_tar, val_tar, devkit])


def _train_tar_records(train_tar: Path, index: dict[str, int],
                       read: Callable[[Callable[[], bytes]], Callable[[], bytes]] | None = None
                       ) -> Iterator[Record]:
    """The official train tar: one inner <wnid>.tar per class, in wnid order (2010 and 2012)."""
    # The official tar is uncompressed, so member headers are read by seeking: an inner tar
    # that is not needed (resume, --classes) costs no reading of its images.
    with tarfile.open(train_tar, "r:*") as outer:
        for m in sorted(outer.getmembers(), key=lambda m: m.name):
            wnid = Path(m.name).name.removesuffix(".tar")
            if not m.isfile():
                continue
            if wnid not in index or not m.name.endswith(".tar"):
                yield _skip("train", m.name, "not a <wnid>.tar of a 1000-class wnid")
                continue
            for r in _inner_tar(outer, m, wnid, index[wnid]):
                yield r if read is None or r.skip else dataclasses.replace(r, read=read(r.read))


def _ilsvrc_tree(root: Path, devkit: Path) -> Source:
    """Extracted train/<wnid>/*.JPEG; val either as val/<wnid>/*.JPEG or flat
    val/ILSVRC2012_val_*.JPEG labelled from the devkit (which also gives the class names)."""
    leaves, val_ids = read_devkit(devkit) if devkit.is_file() else ({}, [])
    src = imagefolder(root, dataset="ilsvrc2012", names={w: n for w, n in leaves.values()})
    src.expected_counts = dict(ILSVRC2012_COUNTS)
    src.files = [devkit] if devkit.is_file() else []
    ids = {w: sid for sid, (w, _) in leaves.items()}
    src.classes = [dataclasses.replace(c, ilsvrc_id=ids.get(c.id)) for c in src.classes]
    val = root / "val"
    if not (val_ids and val.is_dir() and any(val.glob("ILSVRC2012_val_*.JPEG"))):
        return src
    index = {c.id: c.index for c in src.classes}
    id_to_index = {sid: index[w] for sid, (w, _) in leaves.items() if w in index}
    folder_records = src.records

    def records(split: str) -> Iterator[Record]:
        if split == "train":
            return folder_records(split)
        files = sorted(p for p in _visible(val) if p.is_file())
        return (_val_record(f.name, f.read_bytes, val_ids, id_to_index) for f in files)

    src.records = records
    return src


def _inner_tar(outer: tarfile.TarFile, member: tarfile.TarInfo, wnid: str, label: int) -> Iterator[Record]:
    try:
        inner = tarfile.open(fileobj=outer.extractfile(member), mode="r:")
        members = sorted((m for m in inner.getmembers() if m.isfile()), key=lambda m: m.name)
    except tarfile.TarError as e:
        yield _skip("train", member.name, f"unreadable inner tar: {e}")
        return
    for m in members:
        yield Record("train", f"{wnid}/{m.name}", label, lambda m=m: inner.extractfile(m).read())


_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")


def _val_record(name: str, read: Callable[[], bytes], val_ids: list[int],
                id_to_index: dict[int, int]) -> Record:
    """Val image n's class is line n of the devkit's ground truth (an ILSVRC2012_ID)."""
    match = _VAL_NAME.search(name)
    if not match:
        return _skip("val", name, "name is not ILSVRC2012_val_NNNNNNNN.JPEG")
    n = int(match.group(1))
    if not 1 <= n <= len(val_ids) or val_ids[n - 1] not in id_to_index:
        return _skip("val", name, "no ground-truth class in the devkit")
    return Record("val", name, id_to_index[val_ids[n - 1]], read)


# ---------------------------------------------------------------- ILSVRC-2010 -----------------
# Table 1's data set. Its class set differs from 2012's, so the classes come from its own
# meta.mat; the labelled test set (Table 1 reports on it) is the split "test".

ILSVRC2010_COUNTS = {"train": 1_261_406, "val": 50_000, "test": 150_000}
ILSVRC2010_FILES = {"train": "ILSVRC2010_images_train.tar", "val": "ILSVRC2010_images_val.tar",
                    "test": "ILSVRC2010_images_test.tar", "devkit": "ILSVRC2010_devkit-1.0.tar.gz",
                    "test_truth": "ILSVRC2010_test_ground_truth.txt"}
GZIP_MAGIC = b"\x1f\x8b"


def gunzip_if_wrapped(read: Callable[[], bytes]) -> Callable[[], bytes]:
    """The 2010 tars hold JPEGs stored gzip-compressed under a .JPEG name: undo the gzip layer
    (bytes that fail to gunzip are passed on as they are, and the decoder reports them)."""
    def wrapped() -> bytes:
        data = read()
        if data[:2] == GZIP_MAGIC:
            try:
                return gzip.decompress(data)
            except (OSError, EOFError):
                return data
        return data
    return wrapped


def ilsvrc2010(root: Path) -> Source:
    """The official ILSVRC-2010 downloads in `root` (read as streams, never extracted)."""
    paths = {k: root / v for k, v in ILSVRC2010_FILES.items()}
    missing = [v for k, v in ILSVRC2010_FILES.items() if k != "test_truth" and not paths[k].is_file()]
    if missing:
        raise SourceError(f"{root}: missing {', '.join(missing)} (expected the official ILSVRC-2010 "
                          "downloads side by side, with ILSVRC2010_test_ground_truth.txt)")
    if not paths["test_truth"].is_file():
        raise SourceError(f"{paths['test_truth']}: not found; the test split is labelled from it "
                          "(one ILSVRC2010_ID per line, in file-name order)")
    leaves, val_ids = read_devkit(paths["devkit"], year=2010)
    test_ids = [int(line) for line in paths["test_truth"].read_text().split()]
    classes = _classes([w for w, _ in leaves.values()], {w: n for w, n in leaves.values()},
                       {w: sid for sid, (w, _) in leaves.items()})
    index = {c.id: c.index for c in classes}
    id_to_index = {sid: index[w] for sid, (w, _) in leaves.items()}
    truth = {"val": val_ids, "test": test_ids}

    def numbered(split: str) -> Iterator[Record]:
        # Members may sit under val/ (test/) or at the top: named by their file name, in its order.
        with tarfile.open(paths[split], "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()),
                             key=lambda m: (Path(m.name).name, m.name))
            for m in members:
                read = gunzip_if_wrapped(lambda m=m: tar.extractfile(m).read())
                yield _numbered_record(split, Path(m.name).name, read, truth[split], id_to_index,
                                       re.compile(rf"ILSVRC2010_{split}_(\d{{8}})\.JPEG$"))

    def records(split: str) -> Iterator[Record]:
        if split == "train":
            return _train_tar_records(paths["train"], index, gunzip_if_wrapped)
        return numbered(split)

    notes = ["class index = position of the wnid among the sorted leaf wnids of the 2010 devkit's "
             "meta.mat (num_children == 0); ILSVRC2010_ID kept per class as ilsvrc_id",
             "test: labelled from ILSVRC2010_test_ground_truth.txt (Table 1 reports on it)",
             "gzip-compressed files named .JPEG are decompressed before decoding"]
    if len(leaves) != 1000:
        notes.append(f"the devkit has {len(leaves)} leaf synsets, not the challenge's 1000")
    return Source("ilsvrc2010", classes, records, None, dict(ILSVRC2010_COUNTS),
                  [paths[k] for k in ("train", "val", "test", "devkit", "test_truth")],
                  {"train": "train", "val": "val", "test": "test"}, notes, ("train", "val", "test"))


def _numbered_record(split: str, name: str, read: Callable[[], bytes], ids: list[int],
                     id_to_index: dict[int, int], pattern: re.Pattern) -> Record:
    """Image n's class is line n of the ground truth (an ILSVRC20xx_ID)."""
    match = pattern.search(name)
    if not match:
        return _skip(split, name, f"name does not match {pattern.pattern}")
    n = int(match.group(1))
    if not 1 <= n <= len(ids) or ids[n - 1] not in id_to_index:
        return _skip(split, name, "no ground-truth class for it")
    return Record(split, name, id_to_index[ids[n - 1]], read)


# ---------------------------------------------------------------- ImageFolder -----------------

def imagefolder(root: Path, *, dataset: str = "imagefolder", names: dict[str, str] | None = None,
                native_size: int | None = None) -> Source:
    """root/train/<class>/* and root/val/<class>/* (root/test/ is taken as val when val/ is absent).

    Names starting with a dot (.ipynb_checkpoints, .DS_Store, ._x.jpg) are not data and are
    ignored at every level: a hidden folder must never become class 0 and shift every label.
    An empty class folder is an error naming it. Entries that are not regular files (broken
    symlinks, symlink loops, FIFOs, sockets) are skipped and listed, never opened."""
    if not (root / "train").is_dir():
        raise SourceError(f"{root}: no train/ folder (expected root/<split>/<class>/<image>)")
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    split_dirs = {"train": root / "train", "val": val_dir}
    ids = sorted(p.name for p in _visible(root / "train") if p.is_dir())
    if not ids:
        raise SourceError(f"{root / 'train'}: no class folders")
    for base in (d for d in split_dirs.values() if d.is_dir()):
        empty = [p.name for p in sorted(_visible(base)) if p.is_dir() and not _holds_a_file(p)]
        if empty:
            raise SourceError(f"{base}: class folder(s) {', '.join(map(repr, empty[:5]))} hold no files; "
                              "remove them or add their images (an empty class is never trained on)")
    classes = _classes(ids, names)
    index = {c.id: c.index for c in classes}

    def records(split: str) -> Iterator[Record]:
        base = split_dirs[split]
        if not base.is_dir():
            return
        top = sorted(_visible(base))
        for stray in (p for p in top if not p.is_dir()):
            yield _skip(split, stray.name, "not inside a class folder")
        for cdir in (p for p in top if p.is_dir()):
            for parts, path, problem in _scan(cdir):
                name = "/".join((cdir.name, *parts))
                if cdir.name not in index:
                    yield _skip(split, name, f"class folder {cdir.name!r} is not among train's classes")
                elif problem is not None:
                    yield _skip(split, name, problem)
                else:
                    yield Record(split, name, index[cdir.name], path.read_bytes)

    origin = {"train": "train", "val": val_dir.name if val_dir.is_dir() else "(none)"}
    return Source(dataset, classes, records, native_size, None, [], origin)


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _holds_a_file(folder: Path) -> bool:
    """Whether a visible regular file lies anywhere below `folder` (stops at the first). Each
    folder (symlinked ones too) is entered once, so links back up (`ln -s . a`) end."""
    entered: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in entered:
            dirnames[:] = []
            continue
        entered.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and os.path.isfile(os.path.join(dirpath, f)) for f in filenames):
            return True
    return False


def _scan(folder: Path) -> list[tuple[tuple[str, ...], Path, str | None]]:
    """Every visible entry below `folder` as (relative parts, path, problem or None), sorted by
    parts. Folders (symlinked ones too) are entered once each, so a symlink loop ends."""
    found: list[tuple[tuple[str, ...], Path, str | None]] = []
    entered: set[tuple[int, int]] = set()

    def visit(d: Path, rel: tuple[str, ...]) -> None:
        st = d.stat()
        if (st.st_dev, st.st_ino) in entered:
            found.append((rel, d, "symlink loop (a folder already read)"))
            return
        entered.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            found.append((rel, d, f"cannot list the folder: {e.strerror}"))
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            parts, path = rel + (e.name,), Path(e.path)
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError:  # e.g. ELOOP: a symlink to itself
                is_dir = is_file = False
            if is_dir:
                visit(path, parts)
            elif is_file:
                found.append((parts, path, None))
            else:
                found.append((parts, path, _not_a_file(path)))

    visit(folder, ())
    return sorted(found, key=lambda t: t[0])


def _not_a_file(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        return "broken symlink (its target does not exist)" if path.is_symlink() else f"unreadable: {e.strerror}"
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not a regular file (never opened)"


# ---------------------------------------------------------------- Tiny-ImageNet ---------------

class _Tree:
    """Read-only file access to a folder or a .zip, by posix path relative to the dataset root."""

    def __init__(self, path: Path):
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
            top = next((n[: -len("wnids.txt")] for n in names if n.endswith("wnids.txt")), None)
            if top is None:
                raise SourceError(f"{path}: no wnids.txt inside the zip")
            self.prefix, self.names = top, [n[len(top):] for n in names if n.startswith(top)]
        else:
            self.prefix, self.root = "", path
            self.names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(self.prefix + name)
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return name in set(self.names) if self.zip is not None else (self.root / name).is_file()


def _words(text: str, wnids: list[str]) -> dict[str, str]:
    pairs = (line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    wanted = set(wnids)
    return {w: n.strip() for w, n in pairs if w in wanted}


def tiny_imagenet(path: Path) -> Source:
    """The official zip (or its extracted folder), or the train-NN.tar.gz shards of shared/data."""
    if path.is_dir() and sorted(path.glob("train-*.tar.gz")):
        return _tiny_shards(path)
    if path.is_dir() and not (path / "wnids.txt").is_file() and (path / "tiny-imagenet-200").is_dir():
        path = path / "tiny-imagenet-200"
    tree = _Tree(path)
    wnids = tree.read("wnids.txt").decode().split()
    words = _words(tree.read("words.txt").decode(), wnids) if tree.exists("words.txt") else {}
    classes = _classes(wnids, words)
    index = {c.id: c.index for c in classes}
    annotations = _annotations(tree.read("val/val_annotations.txt").decode())

    def records(split: str) -> Iterator[Record]:
        if split == "train":
            for name in sorted(n for n in tree.names if n.startswith("train/") and "/images/" in n):
                wnid = name.split("/")[1]
                rel = name[len("train/"):]
                if wnid not in index:
                    yield _skip(split, rel, f"wnid {wnid} is not in wnids.txt")
                else:
                    yield Record(split, rel, index[wnid], lambda n=name: tree.read(n))
            return
        files = sorted((n for n in tree.names if n.startswith("val/images/")),
                       key=lambda n: (annotations.get(Path(n).name, "~"), n))
        for name in files:
            rel, wnid = name[len("val/"):], annotations.get(Path(name).name)
            if wnid not in index:
                yield _skip(split, rel, f"val annotation {wnid!r} is not a wnid in wnids.txt")
            else:
                yield Record(split, rel, index[wnid], lambda n=name: tree.read(n))

    files = [path] if path.is_file() else []
    return Source("tiny-imagenet", classes, records, 64, dict(TINY_IMAGENET_COUNTS), files,
                  notes=["val labels from val/val_annotations.txt; val images of wnids not in "
                         "wnids.txt are skipped and listed"])


def _annotations(text: str) -> dict[str, str]:
    """val_annotations.txt: file, wnid, box → {file: wnid}."""
    return {p[0]: p[1] for p in (line.split("\t") for line in text.splitlines()) if len(p) >= 2}


def _tiny_shards(root: Path) -> Source:
    """shared/data/tiny-imagenet-200: members <wnid>/<file>; val_annotations.txt lists 2 extra
    (dropped) classes, so it is filtered with wnids.txt and used only as a cross-check."""
    wnids = (root / "wnids.txt").read_text().split()
    words = _words((root / "words.txt").read_text(), wnids) if (root / "words.txt").is_file() else {}
    classes = _classes(wnids, words)
    index = {c.id: c.index for c in classes}
    ann_path = root / "val_annotations.txt"
    annotations = _annotations(ann_path.read_text()) if ann_path.is_file() else {}
    shards = {"train": sorted(root.glob("train-*.tar.gz")), "val": [root / "val.tar.gz"]}

    def records(split: str) -> Iterator[Record]:
        for shard in shards[split]:
            with tarfile.open(shard, "r|gz") as tar:  # a stream: read() before the next member
                for m in tar:
                    if m.isfile():
                        yield _shard_record(split, tar, m, index, annotations)

    files = [*shards["train"], *shards["val"], root / "wnids.txt"]
    files += [p for p in (root / "words.txt", ann_path) if p.is_file()]
    return Source("tiny-imagenet", classes, records, 64, dict(TINY_IMAGENET_COUNTS), files,
                  notes=["shard layout: val labels from the <wnid>/ folders, cross-checked with "
                         "val_annotations.txt, whose lines for wnids not in wnids.txt are ignored"])


def _shard_record(split: str, tar: tarfile.TarFile, m: tarfile.TarInfo, index: dict[str, int],
                  annotations: dict[str, str]) -> Record:
    wnid = m.name.split("/")[0]
    if wnid not in index:
        return _skip(split, m.name, f"wnid {wnid} is not in wnids.txt")
    if split == "val" and annotations.get(Path(m.name).name, wnid) != wnid:
        return _skip(split, m.name, f"folder {wnid} disagrees with val_annotations.txt")
    return Record(split, m.name, index[wnid], lambda: tar.extractfile(m).read())


# ---------------------------------------------------------------- CIFAR-10 --------------------

def cifar10(root: Path) -> Source:
    """shared/data/cifar10 (train.tar.gz, test.tar.gz of <class>/<name>.jpg) or torchvision's
    download (cifar-10-batches-py/ pickles). The test split is stored as "val"."""
    origin = {"train": "train", "val": "test"}
    classes = _classes(list(CIFAR10_CLASSES))
    index = {c.id: c.index for c in classes}
    if (root / "train.tar.gz").is_file() and (root / "test.tar.gz").is_file():
        tars = {"train": root / "train.tar.gz", "val": root / "test.tar.gz"}

        def records(split: str) -> Iterator[Record]:
            with tarfile.open(tars[split], "r|gz") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    cls = m.name.split("/")[0]
                    if cls not in index:
                        yield _skip(split, m.name, f"class folder {cls!r} is not a CIFAR-10 class")
                    else:
                        yield Record(split, m.name, index[cls], lambda m=m, t=tar: t.extractfile(m).read())

        return Source("cifar10", classes, records, 32, dict(CIFAR10_COUNTS), list(tars.values()), origin,
                      ["the official test split is stored as val"])
    batches = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not (batches / "data_batch_1").is_file():
        raise SourceError(f"{root}: expected train.tar.gz + test.tar.gz, or cifar-10-batches-py/")
    files = {"train": [batches / f"data_batch_{i}" for i in range(1, 6)], "val": [batches / "test_batch"]}
    return Source("cifar10", classes, lambda s: _cifar_pickles(s, files[s]), 32, dict(CIFAR10_COUNTS),
                  [*files["train"], *files["val"]], origin,
                  ["the official test split is stored as val; pixels from the pickles, JPEG-encoded"])


def _cifar_pickles(split: str, files: list[Path]) -> Iterator[Record]:
    for path in files:
        if not path.is_file():
            raise SourceError(f"{path}: missing CIFAR-10 batch")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official format is a Python pickle
        pixels = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        names = batch.get(b"filenames") or [f"{i:05d}".encode() for i in range(len(pixels))]
        for img, label, name in zip(pixels, batch[b"labels"], names):
            yield Record(split, f"{path.name}/{name.decode()}", int(label), lambda img=img: img)


# ---------------------------------------------------------------- torchvision -----------------

def torchvision_dataset(class_name: str, root: Path, *, dataset: str | None = None,
                        expected: dict[str, int] | None = None) -> Source:
    """Any torchvision classification dataset class (download=False). The official test split
    becomes "val". The native size is taken from the first train image when it is square < 256."""
    import torchvision.datasets
    cls = getattr(torchvision.datasets, class_name, None)
    if cls is None:
        raise SourceError(f"torchvision.datasets has no class {class_name!r}")
    params = inspect.signature(cls).parameters
    made = {split: _tv_make(cls, params, root, split) for split in SPLITS}
    train_ds, train_origin = made["train"]
    classes = [ClassInfo(i, str(c), str(c)) for i, c in enumerate(train_ds.classes)]
    first = train_ds[0][0]
    w, h = first.size
    native = w if (w == h and w < 256) else None

    def records(split: str) -> Iterator[Record]:
        ds, origin = made[split]
        for i in range(len(ds)):
            img, target = ds[i]
            yield Record(split, f"{origin}/{i:06d}", int(target), lambda img=img: np.asarray(img))

    origin = {s: made[s][1] for s in SPLITS}
    notes = [f"torchvision.datasets.{class_name}; its {origin['val']} split is stored as val"]
    return Source(dataset or class_name.lower(), classes, records, native, expected,
                  sorted(p for p in root.rglob("*") if p.is_file()), origin, notes)


def _tv_make(cls, params, root: Path, split: str):
    """Build one split: train=True/False, or split= with "val" falling back to "test"."""
    try:
        if "train" in params:
            return cls(root=str(root), train=(split == "train"), download=False), \
                ("train" if split == "train" else "test")
        if "split" in params:
            for name in (["train"] if split == "train" else ["val", "test"]):
                try:
                    return cls(root=str(root), split=name, download=False), name
                except ValueError:
                    continue
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True ..."
        raise SourceError(f"{cls.__name__} at {root}: {e}") from None
    raise SourceError(f"{cls.__name__}: cannot tell how to ask it for the {split} split")


def fashion_mnist(root: Path) -> Source:
    return torchvision_dataset("FashionMNIST", root, dataset="fashion-mnist",
                               expected=dict(FASHION_MNIST_COUNTS))
