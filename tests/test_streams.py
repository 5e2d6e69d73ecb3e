"""Streamed sources (``data.in_memory=False``): a folder of JPEGs as PyTorch's ImageNet
scripts leave it, and TFDS, both cutting each image's views on the host from the whole
decoded image; batches are a function of ``(seed, process, step)``."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from matching_gap import data, errors, schema
from matching_gap.data import image_folder

AUG = schema.AugmentConfig(
    crop_size=16,
    crop_scale=(0.4, 1.0),
    num_views=2,
    num_local_crops=3,
    local_crop_size=8,
    local_crop_scale=(0.05, 0.4),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
)


def write_jpeg_folder(root, per_class: int, *, classes=("a", "b"), seed=0, sizes=None):
    """``root/{train,val}/<class>/*.JPEG``: non-square images (landscape and portrait)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 3)):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = sizes[i % len(sizes)] if sizes else rng.integers(20, 60, 2)
                pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8) + np.uint8(100 * c)
                Image.fromarray(pixels).save(folder / f"{cls}_{i}.JPEG", quality=90)
    return root


def folder_config(root, **overrides):
    values = dict(
        source="image_folder",
        data_dir=str(root),
        image_size=20,
        channels=3,
        in_memory=False,
        eval_split="val",
    )
    return schema.DataConfig(**{**values, **overrides})


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def same(a, b):
    return all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_the_folder_streams_views_that_resume_exactly(tmp_path):
    cfg = folder_config(write_jpeg_folder(tmp_path, 10))
    kwargs = dict(batch_size=8, seed=3, process_count=2, augment=AUG)
    first = take(data.iterate_folder(cfg, "train", start_step=0, process_index=0, **kwargs), 6)
    for batch in first:
        assert batch.keys() == {"views", "local_views", "label"}
        assert batch["views"].shape == (4, 2, 16, 16, 3) and batch["views"].dtype == np.uint8
        assert batch["local_views"].shape == (4, 3, 8, 8, 3)
        assert batch["label"].shape == (4,)
    again = take(data.iterate_folder(cfg, "train", start_step=0, process_index=0, **kwargs), 6)
    assert same(first, again)
    resumed = take(data.iterate_folder(cfg, "train", start_step=3, process_index=0, **kwargs), 3)
    assert same(first[3:], resumed)  # 20 files, 2 global batches an epoch: across epochs too
    other = take(data.iterate_folder(cfg, "train", start_step=0, process_index=1, **kwargs), 6)
    assert not any(
        np.array_equal(a["views"], b["views"]) for a, b in zip(first, other, strict=True)
    )


def test_processes_read_disjoint_shares_of_each_global_batch(tmp_path):
    """Without views the images come at the stored size: each file once per epoch."""
    root = write_jpeg_folder(tmp_path, 8, sizes=[(20, 20)])
    cfg = folder_config(root)
    # Mark each image by its file index in its top-left pixel block.
    listing = image_folder.list_files(cfg, "train", 0)
    for i, path in enumerate(listing.paths):
        Image.fromarray(np.full((20, 20, 3), i * 10, np.uint8)).save(path, format="PNG")
    seen = []
    for p in range(2):
        it = data.iterate_folder(
            cfg, "train", batch_size=8, seed=0, start_step=0, process_index=p, process_count=2
        )
        seen.append(np.concatenate([b["image"][:, 0, 0, 0] for b in take(it, 2)]))
    ids = np.concatenate(seen) // 10
    assert sorted(ids.tolist()) == list(range(16))  # one epoch: every file once


def test_imagenets_odd_files_decode_and_unreadable_ones_are_named(tmp_path, caplog):
    root = write_jpeg_folder(tmp_path, 2, sizes=[(30, 40)])
    folder = root / "train" / "a"
    rgb = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.JPEG")
    Image.fromarray(rgb).convert("L").save(folder / "grey.JPEG")
    Image.fromarray(rgb).save(folder / "png_inside.JPEG", format="PNG")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    (folder / "truncated.JPEG").write_bytes(buffer.getvalue()[:200])
    (folder / "empty.JPEG").write_bytes(b"")
    cfg = folder_config(root)
    it = data.iterate_folder(
        cfg,
        "train",
        batch_size=9,
        seed=0,
        **dict(start_step=0),
        augment=AUG,
        process_index=0,
        process_count=1,
    )
    with caplog.at_level(logging.WARNING):
        batch = next(it)
    assert batch["views"].shape == (9, 2, 16, 16, 3)
    message = caplog.text
    assert "truncated.JPEG" in message and "empty.JPEG" in message
    for fine in ("cmyk.JPEG", "grey.JPEG", "png_inside.JPEG"):
        assert fine not in message
    # Each unreadable file is a black image in its place: exactly two all-black rows.
    black = (batch["views"].reshape(9, -1).max(axis=1) == 0).sum()
    assert black == 2


def test_the_streamed_evaluation_view_is_dinos(tmp_path):
    root = write_jpeg_folder(tmp_path, 2, sizes=[(30, 50)])
    cfg = folder_config(root, image_size=24)
    split = data.eval_split(
        cfg, "val", batch_size=4, crop_size=16, process_index=0, process_count=1
    )
    assert split.image_shape == (16, 16, 3) and split.num_examples == 6
    batches = list(split.batches())
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    # Resize(24): 30 x 50 -> 24 x 40 (bicubic, PIL), CenterCrop(16): rows 4.., columns 12..
    path = root / "val" / "a" / "a_0.JPEG"
    original = Image.open(path).convert("RGB")
    expected = np.asarray(original.resize((40, 24), Image.BICUBIC))[4:20, 12:28]
    assert np.abs(images[0].astype(float) - expected).mean() < 1.0


def test_streaming_a_folder_is_configurable_and_checked(tmp_path):
    cfg = folder_config(write_jpeg_folder(tmp_path, 3))
    dataset, n = data.training_split(cfg)
    assert dataset is None and n == 6
    with pytest.raises(errors.DataError, match="batch_size 8"):
        data.iterate_folder(
            cfg, "train", batch_size=8, seed=0, start_step=0, process_index=0, process_count=1
        )
    with pytest.raises(errors.ConfigError, match="needs data.source='tfds' or 'image_folder'"):
        schema.DataConfig(in_memory=False)


def test_mock_imagenet_streams_views_from_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = schema.DataConfig(source="tfds", name="imagenet2012", channels=3, in_memory=False)
    kwargs = dict(batch_size=4, seed=3, process_count=2, augment=AUG)
    with tfds.testing.mock_data(num_examples=10):
        first = take(data.iterate_tfds(cfg, "train", start_step=0, process_index=0, **kwargs), 5)
        resumed = take(data.iterate_tfds(cfg, "train", start_step=3, process_index=0, **kwargs), 2)
    assert first[0]["views"].shape == (4, 2, 16, 16, 3)
    assert first[0]["local_views"].shape == (4, 3, 8, 8, 3)
    assert same(first[3:], resumed)


def test_the_recipe_trains_and_probes_on_a_streamed_folder(tmp_path):
    """The ImageNet recipe's shape (global views, local crops, the augmented probe) on a
    streamed folder of non-square JPEGs, on the test's four devices."""
    import os

    from matching_gap import config_lib, train

    root = write_jpeg_folder(tmp_path / "images", 16)
    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    c = config_lib.load_config_file(os.path.join(configs, "image_folder.py"), "smoke")
    c.data.update(source="image_folder", data_dir=str(root), in_memory=False)
    c.augment.update(num_local_crops=2, local_crop_size=32)
    c.eval.update(protocols="knn,features,augmented")
    c.train.update(knn_every=0, compare_random_init=False)
    outcome = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert outcome.finished
    assert outcome.results["eval/knn_top1"] >= 0.5
    from matching_gap.evaluation import evaluate

    entries = evaluate.evaluate_workdir(c, str(tmp_path / "run"))
    assert entries["augmented"]["top1"] >= 0.5
