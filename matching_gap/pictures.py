"""Pictures of what an encoder has learned, for people who would rather look than read.

- :func:`neighbour_grid`: query images and their nearest training images by feature cosine
  similarity, the trained encoder next to random init (a green frame: same class as the
  query; red: another class).
- :func:`embedding_map`: a 2-D t-SNE map of test features, coloured by class.
- :func:`plan_picture` and :func:`confused_pairs`: a batch's transport plan P* next to the
  identity of the true pairs, and the image pairs holding the most off-diagonal mass (what
  the embedding still confuses); the trainer writes both to TensorBoard during training.

:func:`write_pictures` writes ``<workdir>/pictures/neighbours.png`` and ``embedding.png``
at the end of training (``train.pictures``) and in ``--mode=pictures``; every
``train.plan_every`` steps the trainer writes the plan images to TensorBoard (tag ``plan/``)
and the latest ones to ``<workdir>/pictures/transport_plan.png`` and ``confused_pairs.png``.
Everything is drawn with Pillow into uint8 arrays (no plotting library needed).
"""

from __future__ import annotations

import io
import os
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw

from matching_gap import augment, data, errors, losses, metrics, schema, state, storage
from matching_gap.evaluation.encoder import make_encode

# Fashion-MNIST's classes in label order (the IDX files carry no names).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# matplotlib's tab10 colours, for up to 10 classes (more classes cycle through them).
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    np.uint8,
)
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)
_GOOD, _BAD = (40, 170, 60), (220, 40, 40)
_TEXT_HEIGHT = 14


def _rgb(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, h, w, c]`` (c = 1 or 3) as RGB."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _tile(image: np.ndarray, scale: int, frame: tuple | None, pad: int = 2) -> np.ndarray:
    """One image enlarged ``scale`` times inside a ``pad``-pixel frame (white if None)."""
    image = np.kron(image, np.ones((scale, scale, 1), np.uint8))
    h, w = image.shape[:2]
    out = np.empty((h + 2 * pad, w + 2 * pad, 3), np.uint8)
    out[...] = _WHITE if frame is None else frame
    out[pad : pad + h, pad : pad + w] = image
    return out


def _text(canvas: Image.Image, xy: tuple[int, int], text: str, fill=_BLACK) -> None:
    ImageDraw.Draw(canvas).text(xy, text, fill=fill)


def nearest(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[q, k]`` of each query's ``k`` most cosine-similar keys, most similar first."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    c = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    sims = q @ c.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def neighbour_grid(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    neighbours: dict[str, np.ndarray],
    *,
    scale: int = 2,
) -> np.ndarray:
    """One row per query: the query, then for each entry of ``neighbours`` (title -> indices
    ``[q, k]`` into the training images) its k neighbours, framed green when they share the
    query's label and red when not; the titles and each panel's share of same-class
    neighbours head the columns. Returns uint8 RGB ``[H, W, 3]``."""
    queries, train = _rgb(query_images), _rgb(train_images)
    query_labels, train_labels = np.asarray(query_labels), np.asarray(train_labels)
    cell, gap = queries.shape[2] * scale + 4, 8
    spacer = np.full((queries.shape[1] * scale + 4, gap, 3), 255, np.uint8)
    rows = []
    for i in range(len(queries)):
        row = [_tile(queries[i], scale, None)]
        for idx in neighbours.values():
            row.append(spacer)
            row += [
                _tile(train[j], scale, _GOOD if train_labels[j] == query_labels[i] else _BAD)
                for j in idx[i]
            ]
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + _TEXT_HEIGHT), _WHITE)
    canvas.paste(Image.fromarray(grid), (0, _TEXT_HEIGHT))
    _text(canvas, (2, 1), "query")
    for p, (title, idx) in enumerate(neighbours.items()):
        share = float(np.mean(train_labels[idx] == query_labels[:, None]))
        x = cell + gap + p * (idx.shape[1] * cell + gap)
        _text(canvas, (x + 2, 1), f"{title}: {100 * share:.0f}% same class")
    return np.asarray(canvas)


def tsne(features: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """scikit-learn's t-SNE of ``features`` (after PCA to at most 50 dimensions), ``[n, 2]``."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, np.float64)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    components = min(50, *x.shape)  # PCA needs no more components than samples
    if x.shape[1] > components:
        x = PCA(components, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)


def embedding_map(
    points: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: list[str],
    *,
    size: int = 420,
) -> np.ndarray:
    """Scatter plots of 2-D ``points`` (title -> ``[n, 2]``) side by side, one colour per
    class, with a legend. Returns uint8 RGB ``[H, W, 3]``."""
    legend_width = 110
    width = len(points) * (size + 10) + legend_width
    canvas = Image.new("RGB", (width, size + _TEXT_HEIGHT + 10), _WHITE)
    draw = ImageDraw.Draw(canvas)
    labels = np.asarray(labels)
    for panel, (title, xy) in enumerate(points.items()):
        x0, y0 = panel * (size + 10) + 5, _TEXT_HEIGHT + 5
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline=(200, 200, 200))
        draw.text((x0, 1), title, fill=_BLACK)
        lo, hi = xy.min(0), xy.max(0)
        pix = (xy - lo) / np.maximum(hi - lo, 1e-12) * (size - 12) + 6
        for (px, py), label in zip(pix, labels, strict=True):
            colour = tuple(int(v) for v in PALETTE[label % len(PALETTE)])
            draw.ellipse([x0 + px - 1.5, y0 + py - 1.5, x0 + px + 1.5, y0 + py + 1.5], fill=colour)
    lx = len(points) * (size + 10) + 5
    for c, name in enumerate(class_names):
        colour = tuple(int(v) for v in PALETTE[c % len(PALETTE)])
        y = _TEXT_HEIGHT + 8 + 14 * c
        draw.rectangle([lx, y + 2, lx + 8, y + 10], fill=colour)
        draw.text((lx + 12, y), name, fill=_BLACK)
    return np.asarray(canvas)


def plan_picture(plan: np.ndarray, *, scale: int = 2) -> np.ndarray:
    """The plan ``[n, n]`` (times n, so the true pairs' identity is 1 on the diagonal; black
    = 1 or more, white = 0) next to that identity. Returns uint8 RGB ``[H, W, 3]``."""
    n = plan.shape[0]
    mass = np.clip(np.asarray(plan, np.float64) * n, 0.0, 1.0)
    block = np.ones((scale, scale), np.uint8)
    shade = lambda m: np.kron(np.round(255 * (1 - m)).astype(np.uint8), block)
    gap = np.full((n * scale, 4 * scale), 255, np.uint8)
    picture = np.concatenate([shade(mass), gap, shade(np.eye(n))], axis=1)
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + _TEXT_HEIGHT), _WHITE)
    canvas.paste(Image.fromarray(picture).convert("RGB"), (0, _TEXT_HEIGHT))
    _text(canvas, (0, 1), "P* x n")
    _text(canvas, (n * scale + 4 * scale, 1), "true pairs")
    return np.asarray(canvas)


def confused_pairs(plan: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` off-diagonal entries of ``plan`` with the most mass: ``(i, j, n * P_ij)``,
    largest first (view 1 of image i matched to view 2 of image j)."""
    n = plan.shape[0]
    off = np.asarray(plan, np.float64) * n
    np.fill_diagonal(off, -np.inf)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    return [(int(f // n), int(f % n), float(off.flat[f])) for f in flat]


def pairs_picture(view1: np.ndarray, view2: np.ndarray, pairs, *, scale: int = 2) -> np.ndarray:
    """Each pair ``(i, j, mass)`` as a column: view 1 of image i above view 2 of image j,
    with the mass. ``view1``/``view2``: uint8 ``[n, h, w, c]``. Returns uint8 RGB."""
    a, b = _rgb(view1), _rgb(view2)
    columns = [
        np.concatenate([_tile(a[i], scale, None), _tile(b[j], scale, None)], axis=0)
        for i, j, _ in pairs
    ]
    strip = np.concatenate(columns, axis=1)
    canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + _TEXT_HEIGHT), _WHITE)
    canvas.paste(Image.fromarray(strip), (0, _TEXT_HEIGHT))
    cell = a.shape[2] * scale + 4
    for c, (_, _, mass) in enumerate(pairs):
        _text(canvas, (c * cell + 2, 1), f"{mass:.2f}")
    return np.asarray(canvas)


_BOX_COLOURS = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (170, 110, 40), (128, 0, 0),
]  # fmt: skip


def views_picture(image: np.ndarray, views: dict, *, pad: int = 6) -> np.ndarray:
    """One image with its training views' boxes drawn, and the views beside it.

    ``image``: uint8 ``[h, w, 3]`` at its own size; ``views``: one entry of
    ``crops.training_views`` (views and boxes in that image's pixels). Each box and its view
    share a colour; global views are drawn with thick lines. Returns uint8 ``[H, W, 3]``.
    """
    h, w = image.shape[:2]
    glob = list(zip(views["views"], views["boxes"], strict=True))
    local = list(zip(views.get("local_views", []), views.get("local_boxes", []), strict=True))
    g = glob[0][0].shape[0] if glob else 0
    s = local[0][0].shape[0] if local else 0
    per_row = max(1, (2 * g + pad) // (s + pad)) if s else 1
    local_rows = -(-len(local) // per_row) if local else 0
    width = w + 3 * pad + max(len(glob) * (g + pad), per_row * (s + pad))
    height = max(h, g + pad + local_rows * (s + pad)) + 2 * pad
    canvas = Image.new("RGB", (width, height), _WHITE)
    canvas.paste(Image.fromarray(image), (pad, pad))
    draw = ImageDraw.Draw(canvas)
    x0 = w + 2 * pad
    for k, (view, _) in enumerate(glob):
        canvas.paste(Image.fromarray(view), (x0 + k * (g + pad), pad))
    for k, (view, _) in enumerate(local):
        row, col = divmod(k, per_row)
        canvas.paste(Image.fromarray(view), (x0 + col * (s + pad), 2 * pad + g + row * (s + pad)))
    for k, (_, (top, left, bh, bw)) in enumerate(glob + local):
        colour = _BOX_COLOURS[k % len(_BOX_COLOURS)]
        thick = 4 if k < len(glob) else 2
        box = [pad + left, pad + top, pad + left + bw - 1, pad + top + bh - 1]
        draw.rectangle(box, outline=colour, width=thick)
        if k < len(glob):
            x, y, size = x0 + k * (g + pad), pad, g
        else:
            row, col = divmod(k - len(glob), per_row)
            x, y, size = x0 + col * (s + pad), 2 * pad + g + row * (s + pad), s
        draw.rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline=colour, width=thick)
    return np.asarray(canvas)


def views_to_uint8(views: np.ndarray, aug_config: augment.AugmentConfig) -> np.ndarray:
    """Normalised views (the encoder's input) back to uint8 pixels, for pictures."""
    mean, std = np.asarray(aug_config.mean), np.asarray(aug_config.std)
    return np.clip(np.round((np.asarray(views) * std + mean) * 255), 0, 255).astype(np.uint8)


def make_plan_batch(config, graphdef, *, max_images: int = 128):
    """Jitted ``plan_batch(params, teacher, images, step) -> (views [2, n, ...], student
    [n, d], targets [n, d])`` for the first ``n <= max_images`` images of a training batch:
    the two global views (augmented as at ``step``), the student's predictions of view 1 and
    the targets of view 2 (the EMA teacher's projections when ``teacher`` is not None, else
    the student's): the two sides of the loss's OT problem."""
    from flax import nnx

    aug_config = config.augment
    base_key = jax.random.key(config.seed)

    @jax.jit
    def plan_batch(params, teacher, images, step):
        first = jax.tree.map(lambda x: x[:max_images], images)
        views, _ = augment.views_for(jax.random.fold_in(base_key, step), first, aug_config)
        student = nnx.merge(graphdef, params)(views[0])["predictions"]
        source = params if teacher is None else teacher
        targets = nnx.merge(graphdef, source)(views[1])["projections"]
        return views[:2], student, targets

    return plan_batch


def plan_images(
    config, views: np.ndarray, student: np.ndarray, targets: np.ndarray, *, num_pairs: int = 8
) -> dict[str, np.ndarray]:
    """TensorBoard images of one batch: ``transport_plan`` (P* between ``student`` and
    ``targets``, ``[n, d]`` each, with the config's loss settings, next to the true pairs)
    and ``confused_pairs`` (the ``num_pairs`` image pairs holding the most off-diagonal
    mass; ``views``: the normalised views ``[2, n, h, w, c]``). ``[1, H, W, 3]`` uint8 each.
    """
    lc = config.loss
    on_device = losses.transport_plan(
        student,
        targets,
        epsilon=lc.epsilon,
        cost=lc.cost,
        normalize=lc.normalize,
        relative_epsilon=lc.relative_epsilon or None,
        sinkhorn_options={
            "threshold": lc.sinkhorn_threshold,
            "max_iterations": lc.sinkhorn_max_iterations,
        },
    )
    plan = np.asarray(jax.device_get(on_device))
    aug_config = config.augment
    pixels = [views_to_uint8(views[v], aug_config) for v in range(2)]
    pairs = confused_pairs(plan, min(num_pairs, plan.shape[0] * (plan.shape[0] - 1)))
    return {
        "transport_plan": plan_picture(plan)[None],
        "confused_pairs": pairs_picture(pixels[0], pixels[1], pairs, scale=3)[None],
    }


def save_latest(workdir: str, images: dict[str, np.ndarray]) -> None:
    """``<workdir>/pictures/<name>.png`` for each ``[1, H, W, 3]`` image (the latest step's;
    TensorBoard keeps every step's)."""
    for name, image in images.items():
        _save_png(storage.path(workdir, "pictures", f"{name}.png"), image[0])


def _save_png(target, image: np.ndarray) -> None:
    """``image`` ``[H, W, 3]`` uint8 as a PNG file at ``target`` (a storage path)."""
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    storage.write_bytes(target, png.getvalue())


# ---------------------------------------------------------------- the end-of-run pictures


def class_names(config, num_classes: int) -> list[str]:
    """The labelled classes' names where the source has them, else ``class 0``, ..."""
    c = config.data
    if c.source == "fashion_mnist_idx" and num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    if c.source == "image_folder":
        root = os.path.join(c.data_dir, c.eval_split)
        if os.path.isdir(root):
            names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            if len(names) == num_classes:
                return names
    if c.source == "tfds":
        try:
            import tensorflow_datasets as tfds

            builder = tfds.builder(c.name, data_dir=c.data_dir or None)
            names = list(builder.info.features["label"].names)
            if len(names) == num_classes:
                return names
        except Exception:  # noqa: BLE001 (names are decoration: fall back to numbers)
            pass
    return [f"class {i}" for i in range(num_classes)]


def _load(config, split: str, max_examples: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first ``max_examples`` images and labels of ``split``, read by this process."""
    data_config = config.data
    s = data.eval_split(
        data_config,
        split,
        batch_size=config.eval.batch_size,
        max_examples=max_examples,
        process_index=0,
        process_count=1,
        crop_size=config.augment.crop_size,
    )
    images, labels = [], []
    for batch in s.batches():
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images), np.concatenate(labels), s.num_classes


def _features(encode, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:  # one compiled shape
            chunk = np.concatenate(
                [chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)]
            )
        out.append(np.asarray(jax.device_get(encode(params, chunk)))[:real])
    return np.concatenate(out)


def write_pictures(
    config,
    graphdef,
    params,
    random_params: Any | None,
    workdir: str,
    *,
    train_examples: int = 10_000,
    test_examples: int = 1_000,
    neighbours: int = 8,
) -> list[str]:
    """Writes ``<workdir>/pictures/neighbours.png`` (one query per class from the evaluation
    split and its nearest neighbours among the first ``train_examples`` images of the
    evaluator's training split) and ``embedding.png`` (t-SNE of the first ``test_examples``
    evaluation images), trained encoder next to ``random_params`` when given. Returns the
    paths. Process 0 writes; other processes return ``[]``."""
    if jax.process_index() != 0:
        return []
    encode = make_encode(config, graphdef)
    train_images, train_labels, num_classes = _load(
        config, config.data.eval_train_split, train_examples
    )
    test_images, test_labels, _ = _load(config, config.data.eval_split, test_examples)
    encoders = {"trained encoder": params}
    if random_params is not None:
        encoders["random init"] = random_params
    batch = config.eval.batch_size
    queries = np.array(
        [
            np.flatnonzero(test_labels == c)[0]
            for c in range(num_classes)
            if np.any(test_labels == c)
        ]
    )
    found, points = {}, {}
    for title, p in encoders.items():
        train_feats = _features(encode, p, train_images, batch)
        test_feats = _features(encode, p, test_images, batch)
        found[title] = nearest(test_feats[queries], train_feats, neighbours)
        points[f"{title}: t-SNE of {len(test_feats)} test images"] = tsne(
            test_feats, seed=config.seed
        )
    names = class_names(config, num_classes)
    grid = neighbour_grid(
        test_images[queries], test_labels[queries], train_images, train_labels, found
    )
    paths = [
        storage.path(workdir, "pictures", name) for name in ("neighbours.png", "embedding.png")
    ]
    _save_png(paths[0], grid)
    _save_png(paths[1], embedding_map(points, test_labels, names))
    metrics.log(f"Wrote {paths[0]} and {paths[1]}.")
    return [str(p) for p in paths]


def write_workdir_pictures(config, workdir: str) -> list[str]:
    """``--mode=pictures``: :func:`write_pictures` for the newest checkpoint of ``workdir``
    (and the random init of ``config.seed`` when ``train.compare_random_init``)."""
    from flax import nnx

    if jax.process_count() > 1:
        raise errors.UserError(
            "--mode=pictures runs on one process (one host): run it without --num_processes."
        )
    config = schema.parse(config)
    graphdef, params, step = state.restore_encoder(config, workdir)
    random_params = None
    if config.train.compare_random_init:
        random_params = nnx.to_pure_dict(nnx.split(state.create_model(config))[1])
    metrics.log(f"Drawing the pictures of the checkpoint at step {step}.")
    return write_pictures(config, graphdef, params, random_params, workdir)
