"""Tests of matching_gap.data: the three image sources and the batch iterators."""

import dataclasses
import gzip
import logging
import os
import struct

import numpy as np
import pytest

from matching_gap import augment, data, errors, schema

FASHION_DIR = data.DEFAULT_FASHION_MNIST_DIR
ONE_PROCESS = dict(seed=0, start_step=0, process_index=0, process_count=1)


def _config(**overrides):
    values = dict(source="fashion_mnist_idx", image_size=28, channels=1)
    values.update(overrides)
    return data.DataConfig(**values)


# --------------------------------------------------------------------------------------
# DataConfig


def test_the_data_section_of_a_config_dict_and_of_a_mapping():
    ml_collections = pytest.importorskip("ml_collections")
    values = {f.name: getattr(_config(), f.name) for f in dataclasses.fields(data.DataConfig)}
    values.update(max_examples=5, name="mnist")
    cfg = schema.parse(ml_collections.ConfigDict({"data": values})).data
    assert cfg == schema.parse({"data": values}).data == _config(max_examples=5, name="mnist")
    hash(cfg)  # frozen and hashable, like AugmentConfig
    with pytest.raises(errors.ConfigError, match=r"data: unknown fields \['mock'\]"):
        schema.parse({"data": {**values, "mock": True}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(source="csv"), "'fashion_mnist_idx', 'tfds', 'image_folder'"),
        (dict(image_size=0), "image_size must be a positive"),
        (dict(image_size=2.5), "image_size must be an integer"),
        (dict(channels=2), "channels must be 1 or 3"),
        (dict(max_examples=-1), "max_examples must be an integer >= 0"),
        (dict(eval_max_examples=-2), "eval_max_examples must be an integer >= 0"),
        (dict(shuffle_buffer=0), "shuffle_buffer must be a positive"),
        (dict(source="tfds", name=""), "needs data.name"),
        (dict(source="image_folder"), "needs --config.data.data_dir"),
        (dict(eval_split="validation"), "fashion_mnist_idx has splits"),
        (dict(in_memory=False), "needs data.source='tfds'"),
    ],
)
def test_data_config_rejects_bad_values(overrides, message):
    with pytest.raises(errors.ConfigError, match=message) as info:
        _config(**overrides)
    assert isinstance(info.value, ValueError)


def test_loaders_take_a_data_config():
    with pytest.raises(TypeError, match="schema.DataConfig"):
        data.load_split({"source": "fashion_mnist_idx", "image_size": 28, "channels": 1}, "train")
    with pytest.raises(errors.ConfigError, match="streams TFDS"):
        data.iterate_tfds(_config(), "train", batch_size=2, **ONE_PROCESS)


def test_import_tensorflow_hides_gpus_once(monkeypatch):
    tf = pytest.importorskip("tensorflow")
    calls = []

    def fake_set_visible_devices(devices, device_type):
        calls.append((devices, device_type))
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", fake_set_visible_devices)
    data.import_tensorflow.cache_clear()
    try:
        assert data.import_tensorflow() is tf  # the RuntimeError is caught
        assert data.import_tensorflow() is tf
    finally:
        data.import_tensorflow.cache_clear()
    assert calls == [([], "GPU")]


def _write_idx(directory, stem, array, magic):
    with gzip.open(os.path.join(directory, stem + ".gz"), "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (n, image_stem, label_stem) in {
        "train": (7, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": (3, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }.items():
        images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(tmp_path, image_stem, images, 2051)
        _write_idx(tmp_path, label_stem, labels, 2049)
        arrays[split] = (images, labels)
    return tmp_path, arrays


# --------------------------------------------------------------------------------------
# fashion_mnist_idx


def test_idx_reader_reads_what_was_written(tiny_idx_dir):
    directory, arrays = tiny_idx_dir
    for split in ("train", "test"):
        ds = data.load_split(_config(data_dir=str(directory), image_size=6), split)
        images, labels = arrays[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(images), 6, 6, 1)
        assert ds.labels.dtype == np.int32
        np.testing.assert_array_equal(ds.images[..., 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.num_classes == 10 and ds.name == "fashion_mnist"


def test_idx_resize_channels_and_max_examples(tiny_idx_dir):
    directory, arrays = tiny_idx_dir
    images, labels = arrays["train"]
    cfg = _config(data_dir=str(directory), image_size=6, channels=3, max_examples=4)
    ds = data.load_split(cfg, "train")
    assert ds.images.shape == (4, 6, 6, 3)
    # The subset keeps the file order, and grey to RGB repeats the channel.
    kept = [
        int(np.flatnonzero((images == image[..., 0]).all(axis=(1, 2)))[0]) for image in ds.images
    ]
    assert kept == sorted(kept) and len(set(kept)) == 4
    np.testing.assert_array_equal(ds.labels, labels[kept])
    np.testing.assert_array_equal(ds.images[..., 0], ds.images[..., 2])
    # Upsampling by 2 keeps the mean brightness roughly.
    big = data.load_split(dataclasses.replace(cfg, image_size=12), "train", max_examples=0)
    assert big.images.shape == (7, 12, 12, 3)
    assert abs(big.images.mean() - images.mean()) < 8


def test_idx_max_examples_draws_every_class(tmp_path):
    # Sorted labels, as a file grouped by class would have them: the first 6 are all 0.
    labels = np.repeat(np.arange(3, dtype=np.uint8), 10)
    images = np.broadcast_to(np.arange(30, dtype=np.uint8)[:, None, None], (30, 4, 4))
    _write_idx(tmp_path, "train-images-idx3-ubyte", images, 2051)
    _write_idx(tmp_path, "train-labels-idx1-ubyte", labels, 2049)
    cfg = _config(data_dir=str(tmp_path), image_size=4, max_examples=6)
    ds = data.load_split(cfg, "train")
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=3), [2, 2, 2])
    np.testing.assert_array_equal(ds.labels, labels[ds.images[:, 0, 0, 0]])
    again = data.load_split(cfg, "train")
    np.testing.assert_array_equal(again.images, ds.images)  # deterministic


def test_idx_bad_magic_is_rejected(tiny_idx_dir):
    directory, _ = tiny_idx_dir
    _write_idx(directory, "train-labels-idx1-ubyte", np.zeros(7, np.uint8), 1234)
    with pytest.raises(errors.DataError, match="magic 1234.*--config.data.data_dir"):
        data.load_split(_config(data_dir=str(directory), image_size=6), "train")


def test_idx_missing_dir_fails_fast_with_fixes(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_split(_config(data_dir=str(tmp_path / "nowhere")), "train")
    assert data.DataNotFoundError is errors.DataNotFoundError
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, errors.UserError)
    message = str(info.value)
    assert "apt-get install" in message and "dataset-fashion-mnist" in message
    assert "--config.data.data_dir" in message


def test_unknown_split():
    with pytest.raises(errors.DataError, match="splits.*--config.data"):
        data.load_split(_config(), "validation")


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist():
    train = data.load_split(_config(), "train")
    test = data.load_split(_config(), "test")
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)
    assert 50 < train.images.mean() < 100  # dark backgrounds, not noise or zeros


# --------------------------------------------------------------------------------------
# tfds


def _tfds():
    return pytest.importorskip("tensorflow_datasets")


def _tfds_config(name, **overrides):
    return _config(source="tfds", name=name, **overrides)


def test_tfds_mock_fashion_mnist_and_cifar10():
    tfds = _tfds()
    with tfds.testing.mock_data(num_examples=5):
        ds = data.load_split(_tfds_config("fashion_mnist"), "train")
        assert ds.images.shape == (5, 28, 28, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10
        assert ds.name == "fashion_mnist"

        cifar = data.load_split(_tfds_config("cifar10", image_size=32, channels=3), "test")
        assert cifar.images.shape == (5, 32, 32, 3) and cifar.num_classes == 10
        assert set(cifar.labels.tolist()) <= set(range(10))

        small = data.load_split(
            _tfds_config("cifar10", image_size=16, channels=1, max_examples=3), "train[:50%]"
        )
        assert small.images.shape == (3, 16, 16, 1)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _same(batches_a, batches_b):
    return all(
        np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
        for a, b in zip(batches_a, batches_b, strict=True)
    )


def test_iterate_tfds_mock_imagenet():
    tfds = _tfds()
    cfg = _tfds_config("imagenet2012", image_size=32, channels=3)
    kwargs = dict(batch_size=4, seed=3, process_count=2)
    with tfds.testing.mock_data(num_examples=10):
        # The mock has 10 examples per process: 2 steps per epoch, 5 steps span 3 epochs.
        first = _take(data.iterate_tfds(cfg, "train", start_step=0, process_index=0, **kwargs), 5)
        for batch in first:
            assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        again = _take(data.iterate_tfds(cfg, "train", start_step=0, process_index=0, **kwargs), 5)
        assert _same(first, again)
        resumed = _take(data.iterate_tfds(cfg, "train", start_step=3, process_index=0, **kwargs), 2)
        assert _same(first[3:], resumed)
        assert not _same(first[:2], first[2:4])  # epochs are reshuffled
        # The mock ignores split slices, so this only checks per-process shuffle seeds;
        # test_iterate_tfds_processes_read_disjoint_slices checks real slicing.
        other = _take(data.iterate_tfds(cfg, "train", start_step=0, process_index=1, **kwargs), 5)
        assert not _same(first, other)


def _prepare_tfds(data_dir, class_name, examples, num_classes):
    """Prepares a real (not mocked) TFDS dataset, named after ``class_name``, in ``data_dir``.

    ``examples`` are ``(uint8 [h, w, 3], label)`` pairs, all in the split "train".
    """
    tfds = _tfds()

    def info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def generate_examples(self):
        for i, (image, label) in enumerate(examples):
            yield i, {"image": image, "label": label}

    methods = dict(
        VERSION=tfds.core.Version("1.0.0"),
        _info=info,
        _split_generators=lambda self, dl_manager: {"train": self._generate_examples()},
        _generate_examples=generate_examples,
    )
    builder_class = type(class_name, (tfds.core.GeneratorBasedBuilder,), methods)
    builder_class(data_dir=str(data_dir)).download_and_prepare(file_format="tfrecord")


@pytest.fixture(scope="module")
def tiny_prepared_tfds(tmp_path_factory):
    """A real 40-example TFDS dataset whose label is the example index."""
    data_dir = tmp_path_factory.mktemp("tfds")
    examples = [(np.full((8 + i % 5, 10, 3), i, np.uint8), i) for i in range(40)]
    _prepare_tfds(data_dir, "TinyIndexedImages", examples, num_classes=40)
    return str(data_dir)


def test_iterate_tfds_processes_read_disjoint_slices(tiny_prepared_tfds):
    cfg = _tfds_config("tiny_indexed_images", data_dir=tiny_prepared_tfds, image_size=8, channels=3)
    seen = []
    for process in range(2):
        iterator = data.iterate_tfds(
            cfg, "train", batch_size=4, seed=0, start_step=0, process_index=process, process_count=2
        )
        epoch = np.concatenate([batch["label"] for batch in _take(iterator, 5)])
        assert len(set(epoch.tolist())) == 20  # one epoch of a 20-example slice
        # Images were resized from varying heights; their value still encodes the index.
        batch = next(iterator)
        assert batch["image"].shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(batch["image"][:, 4, 4, 0], batch["label"])
        seen.append(set(epoch.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))

    ds = data.load_split(cfg, "train")
    assert ds.images.shape == (40, 8, 8, 3) and sorted(ds.labels.tolist()) == list(range(40))


def test_tfds_missing_data_fails_fast_with_fixes(tmp_path):
    _tfds()  # (never a download: without download=False TFDS would retry for minutes)
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_split(_tfds_config("fashion_mnist", data_dir=str(tmp_path)), "train")
    message = str(info.value)
    assert (
        "tfds.builder('fashion_mnist', data_dir='DIR').download_and_prepare()" in message
        and "--config.data.data_dir" in message
    )
    assert "--config.data.source=fashion_mnist_idx" in message
    with pytest.raises(data.DataNotFoundError, match=r"tfds\.builder\('imagenet2012'"):
        data.iterate_tfds(
            _tfds_config("imagenet2012", data_dir=str(tmp_path), image_size=32, channels=3),
            "train",
            batch_size=2,
            **ONE_PROCESS,
        )


# --------------------------------------------------------------------------------------
# image_folder


def _save_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "pets"
    sizes = [(10, 10), (20, 12), (7, 15)]
    for c, cls in enumerate(["cat", "dog"]):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            colour = np.array([40 + 100 * c, 10 * i, 200], np.uint8)
            ext = ".PNG" if i == 2 else ".png"
            _save_png(folder / f"{i}{ext}", np.broadcast_to(colour, (h, w, 3)).copy())
        (folder / "notes.txt").write_text("not an image")
    return root


def test_image_folder(image_root):
    cfg = _config(source="image_folder", data_dir=str(image_root), image_size=10, channels=3)
    ds = data.load_split(cfg, "train")
    assert ds.images.shape == (6, 10, 10, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    assert ds.num_classes == 2 and ds.name == "pets"
    # Flat colours survive the resize of the 20x12 and 7x15 images exactly.
    for i in range(6):
        expected = [40 + 100 * (i // 3), 10 * (i % 3), 200]
        np.testing.assert_array_equal(ds.images[i].reshape(-1, 3), [expected] * 100)

    gray = data.load_split(
        _config(source="image_folder", data_dir=str(image_root), image_size=4, channels=1),
        "train",
    )
    assert gray.images.shape == (6, 4, 4, 1)


def test_image_folder_resize_then_centre_crop(tmp_path):
    # A 16x8 image with dark top and light bottom quarters: the centre crop drops them.
    from PIL import Image

    image = np.full((16, 8, 3), 128, np.uint8)
    image[:4], image[12:] = 0, 255
    (tmp_path / "only").mkdir()
    _save_png(tmp_path / "only" / "a.png", image)
    cfg = _config(source="image_folder", data_dir=str(tmp_path), image_size=4, channels=3)
    ds = data.load_split(cfg, "train")  # no train/ folder: the root holds the classes
    assert ds.images.shape == (1, 4, 4, 3)
    # torchvision's Resize(4) (PIL bicubic, to 4 x 8) then CenterCrop(4): rows 2 to 5.
    expected = np.asarray(Image.fromarray(image).resize((4, 8), Image.BICUBIC))[2:6]
    np.testing.assert_allclose(ds.images[0].astype(int), expected.astype(int), atol=2)
    rows = ds.images[0, :, :, 0].astype(int)
    assert rows[0].max() < 128 < rows[3].min()


def test_image_folder_missing(tmp_path):
    cfg = _config(source="image_folder", data_dir=str(tmp_path / "nothing"), image_size=8)
    with pytest.raises(data.DataNotFoundError, match="Expected layout"):
        data.load_split(cfg, "train")
    (tmp_path / "root" / "a").mkdir(parents=True)
    cfg = _config(source="image_folder", data_dir=str(tmp_path / "root"), image_size=8)
    with pytest.raises(data.DataNotFoundError, match="no .jpg"):
        data.load_split(cfg, "train")
    with pytest.raises(data.DataNotFoundError, match="no sub-directory 'test'"):
        data.load_split(cfg, "test")


def _image_folder_config(root, **overrides):
    return _config(source="image_folder", data_dir=str(root), **overrides)


def test_image_folder_skips_a_truncated_jpeg_and_names_it(tmp_path, caplog):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "train" / "noise"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(folder / f"{i}.jpg")
    broken = folder / "1.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        ds = data.load_split(_image_folder_config(tmp_path, image_size=8, channels=3), "train")
    assert ds.images.shape == (2, 8, 8, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 1 of 3" in warnings[0] and str(broken) in warnings[0]

    for i in (0, 2):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(errors.DataError, match="none of the 3 image files"):
        data.load_split(_image_folder_config(tmp_path, image_size=8), "train")


def test_image_folder_max_examples_draws_every_class(tmp_path):
    for c in range(3):
        folder = tmp_path / f"class{c}"
        folder.mkdir()
        for i in range(10):
            _save_png(folder / f"{i:02d}.png", np.full((4, 4), 10 * c + i, np.uint8))
    cfg = _image_folder_config(tmp_path, image_size=4, max_examples=6)
    ds = data.load_split(cfg, "train")
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=3), [2, 2, 2])
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0] // 10, ds.labels)
    np.testing.assert_array_equal(data.load_split(cfg, "train").images, ds.images)


@pytest.fixture(scope="module")
def rgb_images_two_ways(tmp_path_factory):
    """The same odd-sized RGB images as a prepared TFDS dataset and as an image folder."""
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, np.uint8) for shape in [(37, 23, 3), (16, 16, 3), (20, 50, 3)]
    ]
    folder = tmp_path_factory.mktemp("folder")
    for label, image in enumerate(images):
        (folder / f"class{label}").mkdir()
        _save_png(folder / f"class{label}" / "image.png", image)

    tfds_dir = tmp_path_factory.mktemp("tfds")
    examples = [(image, label) for label, image in enumerate(images)]
    _prepare_tfds(tfds_dir, "TinyRgbImages", examples, num_classes=3)
    return images, str(folder), str(tfds_dir)


@pytest.mark.parametrize("channels", [3, 1])
def test_sources_prepare_an_image_identically(rgb_images_two_ways, channels):
    images, folder, tfds_dir = rgb_images_two_ways
    common = dict(image_size=16, channels=channels)
    from_folder = data.load_split(_image_folder_config(folder, **common), "train")
    tfds_cfg = _tfds_config("tiny_rgb_images", data_dir=tfds_dir, **common)
    from_tfds = data.load_split(tfds_cfg, "train")
    streamed = next(data.iterate_tfds(tfds_cfg, "train", batch_size=3, **ONE_PROCESS))
    np.testing.assert_array_equal(from_folder.labels, [0, 1, 2])
    for other_images, other_labels in [
        (from_tfds.images, from_tfds.labels),
        (streamed["image"], streamed["label"]),
    ]:
        np.testing.assert_array_equal(other_images[np.argsort(other_labels)], from_folder.images)
    assert from_folder.images.shape == (3, 16, 16, channels)
    if channels == 1:
        # The 16x16 image is stored as it is: its grey is the one LUMA weighting, rounded.
        expected = np.round(images[1].astype(np.float64) @ np.asarray(augment.LUMA))
        np.testing.assert_array_equal(from_folder.images[1, ..., 0], expected)
    else:
        np.testing.assert_array_equal(from_folder.images[1], images[1])


# --------------------------------------------------------------------------------------
# Batch iterators


def _indexed_dataset(n):
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1))
    return data.Dataset(images.copy(), np.arange(n, dtype=np.int32), n, "indexed")


def test_train_batches_resume_is_exact():
    ds = _indexed_dataset(10)
    run = _take(data.train_batches(ds, batch_size=4, seed=7), 7)
    for step in range(7):
        resumed = next(data.train_batches(ds, batch_size=4, seed=7, start_step=step))
        np.testing.assert_array_equal(resumed["label"], run[step]["label"])
        np.testing.assert_array_equal(resumed["image"], run[step]["image"])
    assert run[0]["image"].shape == (4, 2, 2, 1) and run[0]["label"].dtype == np.int32
    other_seed = _take(data.train_batches(ds, batch_size=4, seed=8), 2)
    assert not _same(run[:2], other_seed)


def test_train_batches_epochs_are_permutations():
    ds = _indexed_dataset(10)
    labels = [b["label"] for b in _take(data.train_batches(ds, batch_size=4, seed=1), 6)]
    for epoch in range(3):  # 2 steps per epoch, the last 2 examples of each dropped
        visited = np.concatenate(labels[2 * epoch : 2 * epoch + 2])
        np.testing.assert_array_equal(
            visited, np.random.default_rng([1, epoch]).permutation(10)[:8]
        )
    full = _indexed_dataset(12)
    epoch = np.concatenate(
        [b["label"] for b in _take(data.train_batches(full, batch_size=4, seed=1), 3)]
    )
    np.testing.assert_array_equal(np.sort(epoch), np.arange(12))


def test_train_batches_process_slices():
    ds = _indexed_dataset(24)
    global_run = _take(data.train_batches(ds, batch_size=6, seed=2, start_step=5), 3)
    shares = [
        _take(
            data.train_batches(
                ds, batch_size=6, seed=2, start_step=5, process_index=p, process_count=3
            ),
            3,
        )
        for p in range(3)
    ]
    for step in range(3):
        parts = [shares[p][step]["label"] for p in range(3)]
        assert all(len(part) == 2 for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), global_run[step]["label"])
        assert len(set(np.concatenate(parts).tolist())) == 6


def test_train_batches_bad_arguments():
    ds = _indexed_dataset(10)
    with pytest.raises(ValueError, match="divisible"):
        data.train_batches(ds, batch_size=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="examples"):
        data.train_batches(ds, batch_size=16, seed=0)


def test_eval_split_batches_cover_everything_once():
    ds = _indexed_dataset(10)
    cfg = data.DataConfig(source="fashion_mnist_idx", image_size=2, channels=1)
    batches = list(data.eval_split(cfg, "test", batch_size=4, dataset=ds).batches())
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 2, 2, 1) and batch["mask"].dtype == bool
    np.testing.assert_array_equal([b["mask"].sum() for b in batches], [4, 4, 2])
    real = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(real, np.arange(10))
    np.testing.assert_array_equal(batches[-1]["image"][2:], 0)
    exact = list(data.eval_split(cfg, "test", batch_size=5, dataset=ds).batches())
    assert len(exact) == 2 and all(b["mask"].all() for b in exact)
