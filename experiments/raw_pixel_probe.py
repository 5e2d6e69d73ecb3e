"""The demo's evaluation protocols on raw Fashion-MNIST pixels scaled to [0, 1]: the
``features`` linear probe (default grid, held-out choice) and DINO's weighted 20-NN, on all
60k training and 10k test images. The pages quote the demo's own raw-pixel row instead
(``train.compare_raw_pixels``: the pixels as the encoder sees them, normalised), which reads
differently.

python experiments/raw_pixel_probe.py
"""

import numpy as np

from matching_gap import data
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation import features as features_lib
from matching_gap.evaluation import knn as knn_lib
from matching_gap.evaluation import linear_probe as probe_lib

cfg = data.DataConfig(source="fashion_mnist_idx", image_size=28, channels=1)
tr, te = data.load_split(cfg, "train"), data.load_split(cfg, "test")
mesh = sharding_lib.make_mesh()


def pixels(split):
    x = split.images.reshape(len(split), -1).astype(np.float32) / 255
    return features_lib.from_numpy(x, split.labels, split.num_classes, mesh=mesh, batch_size=1024)


fit, report = pixels(tr), pixels(te)
probe = probe_lib.linear_probe(fit, report, probe_lib.ProbeSettings())
knn = knn_lib.knn_accuracy(fit, report, k=20, temperature=0.07)
print(
    f"raw-pixel linear probe top-1: {100 * probe.top1:.2f}% (lr {probe.learning_rate}, "
    f"weight decay {probe.weight_decay}, chosen on the held-out 5%)"
)
print(f"raw-pixel weighted 20-NN top-1: {100 * knn:.2f}%")
