"""Where the training views land on a 500 x 375 image (ImageNet's most common size): 4,000
global boxes (scale 0.4-1) from torchvision's rule (the numpy transcription in
``tests/test_crops.py``), from the host's and the device's implementations, and, for
comparison, from boxes cut inside the centre square (what a crop of a centre-cropped image
can reach).

    python experiments/crop_statistics.py
"""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import test_crops as t  # noqa: E402

HEIGHT, WIDTH, SCALE = 375, 500, (0.4, 1.0)


def row(name, boxes):
    share, aspect, edge = t.statistics(boxes, HEIGHT, WIDTH)
    print(f"| {name} | {share.mean():.2f} | {edge.mean():.0%} | {(aspect > 1.2).mean():.0%} |")


def main():
    print(
        f"| {t.DRAWS} global boxes {SCALE} on {WIDTH} x {HEIGHT} | mean share of the image "
        "| reach an outer 10% strip (left or right) | wider than 1.2 |"
    )
    print("|---|---:|---:|---:|")
    row("torchvision (transcription, numpy)", t.reference_boxes(HEIGHT, WIDTH, SCALE))
    row("`crops.tf_crop_box` (host, streamed images)", t.host_boxes(HEIGHT, WIDTH, SCALE))
    row("`augment._sample_crop_box` (device, in memory)", t.device_boxes(HEIGHT, WIDTH, SCALE))
    centre = t.host_boxes(HEIGHT, HEIGHT, SCALE)
    centre[:, 1] += (WIDTH - HEIGHT) // 2
    row("for comparison: inside the centre 375 x 375 square", centre)


if __name__ == "__main__":
    main()
