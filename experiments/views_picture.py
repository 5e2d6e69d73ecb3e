"""``pictures/views.png``: one real photograph at its own size (scikit-learn's sample
``china.jpg``, 640 x 427, CC BY 2.0 by danielbuechele) with the ImageNet recipe's 12 training
views' boxes drawn on it and the views beside it, cut by ``crops.training_views``, the
code the training runs (before the device's flips).

    python experiments/views_picture.py [--config=configs/vitb16.py] [--seed=0]
"""

import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

from matching_gap import config_lib, crops, pictures, schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "vitb16.py"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "pictures", "views.png"))
    args = parser.parse_args()
    config = schema.parse(config_lib.load_config_file(args.config))
    image = load_sample_image("china.jpg")
    views = crops.training_views([image], config.augment, seed=args.seed)[0]
    picture = pictures.views_picture(image, views)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Image.fromarray(picture).save(args.out)
    h, w = image.shape[:2]
    for kind in ("boxes", "local_boxes"):
        boxes = views[kind]
        share = boxes[:, 2] * boxes[:, 3] / (h * w)
        print(f"{kind}: (top, left, height, width) {boxes.tolist()}; shares {np.round(share, 2)}")
    print(f"wrote {args.out} ({picture.shape[1]} x {picture.shape[0]})")


if __name__ == "__main__":
    main()
