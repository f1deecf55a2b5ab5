"""The ``folder`` dataset: a tree of PNG and JPEG images of mixed sizes and modes, every bad input of
issue 26 as one line naming the file or class with nothing half-written, and the decode-once cache.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from toolkit.datasets import DataError, cache, check_labels_per_class, folder, load_dataset
from toolkit.errors import describe_error


def save(path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def uniform(mode: str, size: tuple[int, int], value) -> Image.Image:
    return Image.new(mode, size, value)


def make_tree(root) -> None:
    """labeled/{cat,dog}, unlabeled/ two levels deep, test/cat: PNG and JPEG in modes L, RGB, RGBA, P, I;16."""
    save(root / "labeled/cat/a.png", uniform("L", (12, 12), 77))
    save(root / "labeled/cat/b.png", uniform("RGBA", (12, 16), (0, 0, 0, 0)))  # transparent: white
    save(root / "labeled/cat/deeper/c.jpg", uniform("RGB", (20, 12), (200, 30, 40)), quality=95)
    palette = Image.new("P", (12, 12))
    palette.putpalette([0, 0, 255] + [0] * 765)
    save(root / "labeled/dog/p.png", palette)
    save(root / "labeled/dog/s.png", Image.fromarray(np.full((12, 12), 257 * 100, np.uint16)))  # I;16
    (root / "labeled/cat/.DS_Store").write_bytes(b"\x00junk")  # hidden: skipped, though no image
    save(root / "unlabeled/x/y/u1.png", uniform("L", (30, 30), 10))
    save(root / "unlabeled/u2.jpg", uniform("RGB", (12, 12), (0, 255, 0)), quality=95)
    save(root / "test/cat/t.png", uniform("L", (5, 5), 5))


def test_a_folder_of_mixed_sizes_and_modes_loads(tmp_path):
    make_tree(tmp_path / "imgs")
    ds = load_dataset("folder", tmp_path / "imgs", cache_dir=tmp_path / "cache")
    info = ds.info
    # defaults: 12 is the most common shorter side; a colour image makes 3 channels
    assert (info.name, info.kind, info.image_size, info.channels) == ("folder", "real", 12, 3)
    assert info.class_names == ("cat", "dog") and not info.flips_allowed
    assert ds.labeled_files == ("labeled/cat/a.png", "labeled/cat/b.png", "labeled/cat/deeper/c.jpg",
                                "labeled/dog/p.png", "labeled/dog/s.png")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.labels.dtype == np.int64
    assert ds.unlabeled_files == ("unlabeled/u2.jpg", "unlabeled/x/y/u1.png")
    assert ds.labeled.shape == (5, 3, 12, 12) and ds.unlabeled.shape == (2, 3, 12, 12)
    assert ds.test.shape == (1, 3, 12, 12) and ds.test_labels.tolist() == [0] and ds.test_files == ("test/cat/t.png",)
    gray, clear, jpeg, blue, sixteen = (ds.labeled[i] for i in range(5))
    assert (gray == 77).all() and (clear == 255).all() and (sixteen == 100).all()
    assert blue[:, 0, 0].tolist() == [0, 0, 255] and np.abs(jpeg[:, 6, 6].astype(int) - [200, 30, 40]).max() <= 3
    assert (ds.unlabeled[1] == 10).all() and (ds.test == 5).all()  # 30x30 shrunk, 5x5 grown: uniform stays uniform


def test_stated_size_and_channels_win(tmp_path):
    make_tree(tmp_path / "imgs")
    ds = load_dataset("folder", tmp_path / "imgs", image_size=8, channels=1, cache_dir=tmp_path / "cache")
    assert ds.labeled.shape == (5, 1, 8, 8) and ds.info.channels == 1 and ds.info.mean != (0.5,)
    assert ds.labeled[1, 0, 0, 0] == 255 and ds.labeled[3, 0, 0, 0] == 29  # blue by ITU-R 601-2 luma: 0.114 * 255


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, :4] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    save(tmp_path / "f/labeled/a/x.png", Image.fromarray(wide), exif=exif)
    save(tmp_path / "f/labeled/b/y.png", uniform("RGB", (8, 8), 0))
    ds = load_dataset("folder", tmp_path / "f", image_size=8, cache_dir=tmp_path / "cache")
    upright = ds.labeled[0, 0]
    assert upright[0].mean() > 200 and upright[-1].mean() < 50  # the white half now on top


def grayscale_folder(root):
    save(root / "labeled/a/1.png", uniform("L", (6, 6), 1))
    save(root / "labeled/b/2.png", uniform("L", (6, 6), 2))
    save(root / "labeled/b/3.png", uniform("L", (6, 6), 3))


def test_a_grayscale_folder_defaults_to_one_channel(tmp_path):
    grayscale_folder(tmp_path / "g")
    ds = load_dataset("folder", tmp_path / "g", cache_dir=tmp_path / "cache")
    assert ds.labeled.shape == (3, 1, 6, 6) and ds.unlabeled.shape == (0, 1, 6, 6) and ds.unlabeled_files == ()
    assert ds.test is None and ds.test_labels is None
    with pytest.raises(DataError, match=r"class 'a' has 1 labeled images \(labeled/a/\), fewer than "
                                        r"split.labels_per_class=2"):
        check_labels_per_class(ds, 2)


def _one_class(root):
    save(root / "labeled/cat/1.png", uniform("L", (4, 4), 1))


def _zero_bytes(root):
    (root / "labeled/a/empty.png").write_bytes(b"")


def _truncated(root):
    path = root / "labeled/a/broken.png"
    save(path, Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)))
    path.write_bytes(path.read_bytes()[:200])


def _not_an_image(root):
    (root / "labeled/b/notes.txt").write_text("not pixels")


def _empty_unlabeled(root):
    (root / "unlabeled/sub").mkdir(parents=True)


def _symlink_loop(root):
    (root / "unlabeled/sub").mkdir(parents=True)
    save(root / "unlabeled/sub/u.png", uniform("L", (4, 4), 1))
    os.symlink("../..", root / "unlabeled/sub/back")


def _self_link(root):
    os.symlink("self.png", root / "labeled/a/self.png")


def _bad_class_name(root):
    save(root / "labeled/a:b/1.png", uniform("L", (4, 4), 1))


def _case_clash(root):
    save(root / "labeled/A/1.png", uniform("L", (4, 4), 1))


def _test_class_unknown(root):
    save(root / "test/bird/1.png", uniform("L", (4, 4), 1))


def _image_outside_a_class(root):
    save(root / "labeled/loose.png", uniform("L", (4, 4), 1))


def _typo_at_top(root):
    (root / "unlabelled").mkdir()


def _empty_class(root):
    (root / "labeled/c").mkdir()


BAD = {
    "one class": (_one_class, "has one class ('cat'): a classifier needs at least two"),
    "zero-byte image": (_zero_bytes, "empty image file (0 bytes): {root}/labeled/a/empty.png"),
    "unreadable image": (_truncated, "cannot read image {root}/labeled/a/broken.png"),
    "non-image file": (_not_an_image, "not an image Pillow can read: {root}/labeled/b/notes.txt"),
    "empty unlabeled": (_empty_unlabeled, "{root}/unlabeled is empty"),
    "symlink loop": (_symlink_loop, "symlink loop: {root}/unlabeled/sub/back leads back to"),
    "self link": (_self_link, "cannot read {root}/labeled/a/self.png: Too many levels of symbolic links"),
    "bad class name": (_bad_class_name, "class name 'a:b' in {root}/labeled is not a valid file or metric name"),
    "case clash": (_case_clash, "class names 'A' and 'a' in {root}/labeled differ only in case"),
    "test class unknown": (_test_class_unknown, "{root}/test has class 'bird', which labeled/ lacks"),
    "image outside a class": (_image_outside_a_class, "labeled/loose.png is directly in labeled/"),
    "typo at top": (_typo_at_top, "holds 'unlabelled': expected only labeled/, unlabeled/ and test/"),
    "empty class": (_empty_class, "class 'c' has no images: {root}/labeled/c is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_the_file_and_writes_no_entry(tmp_path, case):
    root = tmp_path / "imgs"
    build, words = BAD[case]
    if case != "one class":
        grayscale_folder(root)
    build(root)
    with pytest.raises(DataError) as err:
        load_dataset("folder", root, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert words.format(root=root) in message
    assert describe_error(err.value) == message and "\n" not in message  # the CLI's one line
    entries = [p for p in (tmp_path / "cache").glob("*") if p.is_dir()] if (tmp_path / "cache").exists() else []
    assert entries == []  # nothing half-written


def test_the_cache_decodes_once_and_follows_changes(tmp_path, monkeypatch):
    make_tree(tmp_path / "imgs")
    decodes = []
    real = folder.decode_image
    monkeypatch.setattr(folder, "decode_image", lambda path, *a: decodes.append(path.name) or real(path, *a))
    first = load_dataset("folder", tmp_path / "imgs", cache_dir=tmp_path / "cache")
    assert len(decodes) == 8
    second = load_dataset("folder", tmp_path / "imgs", cache_dir=tmp_path / "cache")
    assert len(decodes) == 8 and second.info == first.info and np.array_equal(second.labeled, first.labeled)
    assert isinstance(second.labeled, np.memmap)
    # the streamed path: chunks of at most two images read from the memory map give the same bytes
    chunks = [c for _, c in cache.iter_chunks(second.labeled, 2 * second.labeled[0].nbytes)]
    assert len(chunks) == 3 and np.concatenate(chunks).tobytes() == np.asarray(first.labeled).tobytes()
    save(tmp_path / "imgs/labeled/cat/a.png", uniform("L", (12, 12), 90))
    os.utime(tmp_path / "imgs/labeled/cat/a.png", ns=(1, 1))  # a new mtime even on a coarse clock
    third = load_dataset("folder", tmp_path / "imgs", cache_dir=tmp_path / "cache")
    assert len(decodes) == 16 and (third.labeled[0] == 90).all() and third.info.digest != first.info.digest
    assert np.array_equal(third.labeled[1:], first.labeled[1:])


def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
    grayscale_folder(tmp_path / "g")
    first = load_dataset("folder", tmp_path / "g", cache_dir=tmp_path / "cache")
    entry = tmp_path / "cache" / first.info.digest
    (entry / "labeled.npy").write_bytes((entry / "labeled.npy").read_bytes()[:-10])
    again = load_dataset("folder", tmp_path / "g", cache_dir=tmp_path / "cache")
    assert np.array_equal(again.labeled, np.stack([np.full((1, 6, 6), v, np.uint8) for v in (1, 2, 3)]))
