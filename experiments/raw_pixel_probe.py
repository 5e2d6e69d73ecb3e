"""Linear probe of the demo's protocol on raw Fashion-MNIST pixels (the bar to beat).

python experiments/raw_pixel_probe.py
"""

import ml_collections
import numpy as np

from matching_gap import data, evaluators

cfg = ml_collections.ConfigDict(
    dict(source="fashion_mnist_idx", data_dir="", image_size=28, channels=1, max_examples=0)
)
tr, te = data.load_split(cfg, "train"), data.load_split(cfg, "test")
x = tr.images.reshape(len(tr), -1).astype(np.float32) / 255
xt = te.images.reshape(len(te), -1).astype(np.float32) / 255
acc = evaluators.linear_probe_accuracy(
    x,
    tr.labels,
    xt,
    te.labels,
    num_classes=10,
    epochs=100,
    batch_size=1024,
    learning_rate=1e-2,
    weight_decay=1e-4,
)
print(f"raw-pixel linear probe top-1: {100 * acc:.2f}%")
