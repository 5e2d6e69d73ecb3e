"""Linear probe of the demo's protocol on raw Fashion-MNIST pixels (the bar to beat).

python experiments/raw_pixel_probe.py
"""

import numpy as np

from matching_gap import data, evaluators

cfg = data.DataConfig(source="fashion_mnist_idx", image_size=28, channels=1)
tr, te = data.load_split(cfg, "train"), data.load_split(cfg, "test")
pixels = lambda split: split.images.reshape(len(split), -1).astype(np.float32) / 255
acc = evaluators.linear_probe_accuracy(
    evaluators.LabelledFeatures(pixels(tr), tr.labels, tr.num_classes),
    evaluators.LabelledFeatures(pixels(te), te.labels, te.num_classes),
    evaluators.ProbeSettings(epochs=100, batch_size=1024, learning_rate=1e-2, weight_decay=1e-4),
)
print(f"raw-pixel linear probe top-1: {100 * acc:.2f}%")
