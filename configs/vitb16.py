"""The paper's headline: ViT-B/16 on ImageNet-1k with the matching gap, crops + flips only.

    python -m matching_gap.main --config=configs/vitb16.py --workdir=gs://BUCKET/vitb16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Recipe (the paper's abstract and reviews, M3G's heads and epsilon, DINO's defaults where
neither says; experiments/recipes.md section 1): DINO-like student + EMA teacher (momentum
0.996 -> 1), multi-crop (2 global crops of 224 + 10 local crops of 96), horizontal flips and
no other augmentation, projector and predictor "linear 4096 + GeLU -> 256", OT problems of
64 pairs (as M3G: n = 64 per device), epsilon 0.8 on the squared Euclidean cost of unit
vectors (M3G's 0.2 on the circular variance), 300 epochs, AdamW with DINO's schedule (lr
5e-4 x batch / 256, 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4, clip 3.0,
drop-path 0.1), batch 1024, bfloat16 compute. The optimiser settings are not public for the
paper; these are DINO's defaults. Paper: 74.2% linear-probe top-1.

ImageNet is streamed (TFDS ``imagenet2012``, or ``--config.data.source=image_folder
--config.data.eval_split=val`` for a folder of JPEGs as PyTorch's scripts leave it). Each
view is cut on the host as DINO cuts it: torchvision's RandomResizedCrop box on the whole
original image (global scale 0.4-1, local 0.05-0.4), resampled once, bicubic and antialiased;
the evaluation view is DINO's: shorter side to ``data.image_size`` = 256 (bicubic), centre
224 (``matching_gap/crops.py``). Evaluation during training is a k-NN monitor and a linear
probe on 10k-image subsets of train / validation; the paper's full linear-probe protocol is a
separate job.

Variants: ``:strong`` (colour jitter, grayscale, blur, solarize: the strong-augmentation
regime), ``:smoke`` (3 CPU steps, tiny backbone; the tests run it on
``tfds.testing.mock_data``), combinable: ``:strong,smoke``.
"""

from matching_gap import config_lib


def get_config(arg: str | None = None):
    words = config_lib.parse_arg(arg, ("smoke", "strong"))
    c = config_lib.imagenet_recipe("B/16")
    if "strong" in words:
        config_lib.strong_augmentations(c)
    if "smoke" in words:
        config_lib.make_smoke(c)
    return config_lib.finalize(c)
