"""data_prep's ILSVRC-2010 source (Table 1's data set) on small archives in the official layout.

Built in tmp_path from the real imagenet-sample images: the train tar of inner <wnid>.tar
files, val members under val/, test members at the top, both shuffled inside their tars, a
gzip-wrapped JPEG and a CMYK JPEG, a devkit whose leaf ILSVRC2010_IDs are not in sorted-wnid
order and which holds an inner WordNet node, and the test ground truth beside them.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import sources
from data_prep.__main__ import main
from data_prep.pack import Options, prepare
from test_data_prep import FAST, add_bytes, read_set, sample_images, stored_image

PICK = (5, 12, 33, 48, 60, 77, 90)  # imagenet-sample images used as the 2010 classes


def write_meta_2010(synsets: list[tuple[int, str, str, int]]) -> bytes:
    """A 2010 devkit meta.mat: struct array `synsets` with ILSVRC2010_ID, WNID, words, num_children."""
    import scipy.io
    dt = [("ILSVRC2010_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    arr = np.zeros((len(synsets), 1), dtype=dt)
    for i, (sid, wnid, words, children) in enumerate(synsets):
        arr[i, 0] = (np.array([[sid]], np.uint16), wnid, words, "a gloss", np.array([[children]], np.uint16))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def cmyk_jpeg(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def build_2010(shared: Path, root: Path) -> dict:
    rows = [sample_images(shared)[i] for i in PICK]
    src = shared / "imagenet-sample"
    data = {w: (src / name).read_bytes() for name, w, _ in rows}
    wnids = sorted(data)
    root.mkdir(parents=True)
    gz_wnid, cmyk_wnid = wnids[1], wnids[3]
    with tarfile.open(root / "ILSVRC2010_images_train.tar", "w") as outer:
        for wnid in reversed(wnids):  # not in sorted order inside the archive
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for k in (3, 1, 2):
                    blob = data[wnid]
                    if wnid == gz_wnid and k == 2:
                        blob = gzip.compress(blob)  # still named .JPEG, as in the real 2010 tar
                    if wnid == cmyk_wnid and k == 1:
                        blob = cmyk_jpeg(blob)
                    add_bytes(t, f"{wnid}_{k}.JPEG", blob)
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    # Leaf ids NOT in sorted-wnid order (id − 1 would give the wrong class), plus an inner node
    # with a small id of its own (leaves are told by num_children == 0, not by their id range).
    ids = {w: [4, 7, 2, 1, 6, 3, 5][i] + 1 for i, w in enumerate(wnids)}
    synsets = [(1, "n00001740", "entity", 3)] + [(sid, w, f"words of {w}", 0) for w, sid in ids.items()]
    val_order = [wnids[i] for i in (3, 0, 6, 2, 5, 1, 4)]    # val image k shows val_order[k-1]
    test_order = [wnids[i] for i in (6, 5, 0, 4, 1, 3, 2, 0)]
    with tarfile.open(root / "ILSVRC2010_images_val.tar", "w") as t:
        for k in (5, 2, 7, 1, 4, 6, 3):  # shuffled inside the tar, under val/
            blob = data[val_order[k - 1]]
            add_bytes(t, f"val/ILSVRC2010_val_{k:08d}.JPEG", gzip.compress(blob) if k == 4 else blob)
    with tarfile.open(root / "ILSVRC2010_images_test.tar", "w") as t:
        for k in (8, 3, 1, 6, 2, 7, 4, 5):  # shuffled, at the top of the tar
            add_bytes(t, f"ILSVRC2010_test_{k:08d}.JPEG", data[test_order[k - 1]])
    with tarfile.open(root / "ILSVRC2010_devkit-1.0.tar.gz", "w:gz") as t:
        add_bytes(t, "devkit-1.0/data/meta.mat", write_meta_2010(synsets))
        add_bytes(t, "devkit-1.0/data/ILSVRC2010_validation_ground_truth.txt",
                  "".join(f"{ids[w]}\n" for w in val_order).encode())
    (root / "ILSVRC2010_test_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in test_order))
    return {"wnids": wnids, "ids": ids, "val": val_order, "test": test_order,
            "gz": gz_wnid, "cmyk": cmyk_wnid, "data": data}


def test_ilsvrc2010_official_layout(shared_data, tmp_path):
    built = build_2010(shared_data, tmp_path / "in")
    wnids = built["wnids"]
    m = prepare(sources.ilsvrc2010(tmp_path / "in"), tmp_path / "out", Options(**FAST))
    assert [c["id"] for c in m["classes"]] == wnids          # index = position in sorted leaf wnids
    assert [c["ilsvrc_id"] for c in m["classes"]] == [built["ids"][w] for w in wnids]
    assert "n00001740" not in {c["id"] for c in m["classes"]}  # the inner node is no class
    assert list(m["splits"]) == ["train", "val", "test"]
    assert m["skipped"] == []
    index, names, _ = read_set(tmp_path / "out", "train")
    assert len(names) == 3 * len(wnids)
    assert all(wnids[label] == name.split("/")[0] for (_, _, label), name in zip(index, names))
    assert names[:3] == [f"{wnids[0]}/{wnids[0]}_{k}.JPEG" for k in (1, 2, 3)]
    # The gzip-wrapped JPEG decodes to the same pixels as its unwrapped twin.
    gz = names.index(f"{built['gz']}/{built['gz']}_2.JPEG")
    assert np.array_equal(np.asarray(stored_image(tmp_path / "out", "train", gz)),
                          np.asarray(stored_image(tmp_path / "out", "train", gz - 1)))
    assert [c["from"] for c in m["converted"]] == ["JPEG CMYK"]
    assert m["converted"][0]["name"] == f"{built['cmyk']}/{built['cmyk']}_1.JPEG"
    for split in ("val", "test"):
        sindex, snames, _ = read_set(tmp_path / "out", split)
        n = len(built[split])
        assert snames == [f"ILSVRC2010_{split}_{k:08d}.JPEG" for k in range(1, n + 1)]  # file-name order
        assert [wnids[label] for label in sindex[:, 2]] == built[split]
    exp = m["expected_counts"]
    assert exp["checked"] and not exp["match"]
    assert exp["counts"] == {"train": 1_261_406, "val": 50_000, "test": 150_000}


def test_ilsvrc2010_cli_and_missing_files(shared_data, tmp_path, capsys):
    build_2010(shared_data, tmp_path / "in")
    assert main(["ilsvrc2010", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--no-hash", "--classes", "2"]) == 0
    out = capsys.readouterr().out
    assert "test (from test)" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["classes"]) == 2 and manifest["dataset"] == "ilsvrc2010"
    # --holdout would store 2010's val as test in place of its labelled test split: refused.
    assert main(["ilsvrc2010", str(tmp_path / "in"), "--out", str(tmp_path / "o1"), "--holdout", "1"]) == 2
    assert "already has a labelled test split" in capsys.readouterr().err
    (tmp_path / "in" / "ILSVRC2010_test_ground_truth.txt").unlink()
    assert main(["ilsvrc2010", str(tmp_path / "in"), "--out", str(tmp_path / "o2")]) == 2
    assert "ILSVRC2010_test_ground_truth.txt" in capsys.readouterr().err
