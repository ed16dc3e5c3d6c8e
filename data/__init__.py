"""The paper's datasets (Sec. 4.1), read from their official on-disk layouts, and the toy world.

One table, `DATASETS` (data/layouts.py), says for each benchmark where its images and label maps
lie and what the label values mean; two views read it (data/sets.py):

  TrainSet  item = dict(image (3, S, S) in [-1, 1], mask (S, S) float {0, 1}, valid (S, S) float {0, 1},
            prompt str, class_index int): the binary mask of ONE class and its prompt, as Eq. 6 trains
            (Sec. 3.6); valid = 0 where the pixel is not annotated
  EvalSet   item = (image (3, H, W) in [-1, 1], labels (H, W) int64, image path), at the original size

Label maps, as EvalSet yields them, are int64 in class-index space:
  c in [0, C)      class c (the c-th class line of classes/<name>.txt)
  NONE = -1        a valid pixel of no class (DeepGlobe background, REFUGE outside the disc)
  ignore_index     not annotated, not scored: 255, or 65535 where 255 is a class (ADE-847, PC-459)
  SEVERAL + b      a pixel of several classes, those whose bits are set in b (Agriculture-Vision,
                   whose labels overlap; only in datasets of <= metrics.SET_CLASSES classes)

Class lists live in classes/<name>.txt: lines starting with '#' are comments (the first says where
the list comes from), then one class per line in label order; "a, b, c" lists synonyms and the
prompt uses the first ("building, edifice" -> "a photo of a building."). `class_names` holds these
names, made distinct (class_names_of): ADE-847 has nine first synonyms that several classes share
("bag" is three classes), which would give them one prompt and leave all but one unpredictable.
`synonyms` holds the whole lines, which the CLIP proposals average over (model/proposals.py).
Any dataset accepts `classes=PATH`, a list of your own in the same format. The toy world's scenes
(data/toy.py) come in the same two views. `build` picks a view of one split; the scripts need
nothing else from here but the names below.
"""

from data.common import (CLASSES_DIR, IMAGE_SUFFIXES, NONE, DataError, class_names_of, image_to_tensor, load_rgb,
                         pil_to_tensor, read_class_file, read_raw_labels, synonyms_of, tensor_to_pil)
from data.layouts import DATASETS, Spec
from data.sets import EvalSet, MergedTrainSet, TrainSet, augment, build, collate, resize_pair
from data.toy import TOY_CLASSES, TOY_HUES, TOY_SIZE, ToyScenes, ToyTrain, toy_scene

__all__ = ["CLASSES_DIR", "IMAGE_SUFFIXES", "NONE", "DataError", "class_names_of", "image_to_tensor", "load_rgb",
           "pil_to_tensor", "read_class_file", "read_raw_labels", "synonyms_of", "tensor_to_pil", "DATASETS", "Spec",
           "EvalSet", "MergedTrainSet", "TrainSet", "augment", "build", "collate", "resize_pair", "TOY_CLASSES",
           "TOY_HUES", "TOY_SIZE", "ToyScenes", "ToyTrain", "toy_scene"]
