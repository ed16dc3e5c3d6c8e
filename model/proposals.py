"""App. A.3 "class label generation": a frozen CLIP proposes an image's candidate classes.

DiGSeg segments one class per run, so at test time the classes to run come from CLIP: the image
and its patches are compared with the prompts of a vocabulary (select_candidates). digseg.py's
DiGSeg.propose_classes is the entry; eval.py and sample.py call it with the dataset's class list.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import synonyms_of, tensor_to_pil
from model.clip import views as clip_views
from model.cuda import to_device


def select_candidates(image_embed, patch_embeds, text_embeds, vocabulary, tau_global=0.25, tau_patch=0.3):
    """image_embed (E,), patch_embeds (N, E), text_embeds (V, E) -> (classes, scores).

    Global: keep c when cos(image, text_c) > tau_global (the paper: 0.25).
    Patch-level refinement: also keep c when its best patch, max_n cos(patch_n, text_c), exceeds
    tau_patch -- small objects that do not dominate the global embedding. Scores are the larger of
    the two similarities, and the classes come back sorted by score."""
    t = F.normalize(text_embeds.float(), dim=-1)
    g = F.normalize(image_embed.float(), dim=-1) @ t.T                         # (V,)
    p = (F.normalize(patch_embeds.float(), dim=-1) @ t.T).max(dim=0).values    # (V,)
    g, p = torch.stack([g, p]).tolist()                                        # one copy to the host, not one per class
    scores = {c: {"global": g[i], "patch": p[i]} for i, c in enumerate(vocabulary) if g[i] > tau_global or p[i] > tau_patch}
    order = sorted(scores, key=lambda c: -max(scores[c].values()))
    return order, {c: scores[c] for c in order}



class ClassProposer(nn.Module):
    """App. A.3 "class label generation": a frozen CLIP picks an image's candidate classes among a
    vocabulary, by the similarity of its image and patch embeddings to the class prompts
    (select_candidates), on the whole image (model.clip.views), not CLIP's centre crop."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.cache = {}             # (template, class lines) -> the classes' text embeddings (V, E)

    @torch.no_grad()
    def forward(self, image, vocabulary, tau_global=0.25, tau_patch=0.3, template="A photo of a {}.", synonyms=None):
        """image: PIL or (3, H, W) in [-1, 1] -> (classes sorted by score, {class: scores}).
        vocabulary: distinct class names; synonyms: each class's synonym line ("a, b, c"), whose
        embeddings are averaged (text_embeddings), or None: the names alone."""
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"the vocabulary repeats {sorted({c for c in vocabulary if vocabulary.count(c) > 1})}: "
                             f"classes are told apart by their names (data.class_names_of makes them distinct)")
        p = next(self.clip.parameters())
        whole, tiles = clip_views(image if isinstance(image, Image.Image) else tensor_to_pil(image),
                                  self.clip.config.vision_config.image_size)
        square = len(tiles) == 1                                             # the image is its own tile
        views = whole if square else torch.cat([whole, tiles])               # (1 [+ n], 3, S, S): one copy
        img, patches = self.clip.image(to_device(views, p.device).to(p.dtype))   # (1 [+ n], E), (1 [+ n], N, E)
        patches = patches[0] if square else patches[1:].flatten(0, 1)        # the tiles' patches (n*N, E)
        text = self.text_embeddings(tuple(synonyms or vocabulary), template)
        return select_candidates(img[0], patches, text, vocabulary, tau_global, tau_patch)

    def text_embeddings(self, lines, template):
        """One embedding per class line (V, E): the pooled, projected CLIP embedding of each synonym's
        prompt, normalised, averaged over the line's synonyms and normalised again, as CAT-Seg builds
        its class embeddings (cvlab-kaist/CAT-Seg, cat_seg_predictor.py, class_embeddings); a line
        without commas is its one prompt."""
        key = (template, lines)
        if key not in self.cache:
            words = [synonyms_of(line) or [line] for line in lines]
            prompts = [template.format(w) for ws in words for w in ws]
            ids = self.clip.tokenizer(prompts).to(next(self.clip.parameters()).device)
            each = F.normalize(self.clip.text(ids)[1].float(), dim=-1)       # (sum of synonyms, E)
            self.cache[key] = F.normalize(torch.stack([m.mean(dim=0) for m in each.split([len(ws) for ws in words])]),
                                          dim=-1)                            # (V, E)
        return self.cache[key]
