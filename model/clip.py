"""CLIP (Radford et al. 2021) in plain PyTorch: text and vision transformers, and the BPE tokenizer.

DiGSeg uses CLIP three ways:
  - the frozen ViT-L/14 text tower feeds the conditioner: its last hidden state (77 x 768, after the
    final LayerNorm) goes through a small MLP into the U-Net's cross-attention (Sec. 3.5);
  - image and text embeddings propose candidate classes, globally and per patch (App. A.3);
  - SD2's own text encoder is the OpenCLIP ViT-H/14 text tower, of which SD2 uses the
    *penultimate* layer: the HF export keeps 23 of its 24 layers and still applies the final
    LayerNorm, so "the last hidden state of the 23-layer model" is what SD2's U-Net was trained on.

Module names mirror HF transformers' CLIPModel (text_model.encoder.layers.N.self_attn.q_proj, ...,
vision_model.pre_layrnorm [sic], visual_projection), so an HF folder loads with one strict
load_state_dict; OpenAI and OpenCLIP names are converted in model/convert.py.
"""
import gzip
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer as BPETokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from model.attention import attention

CONTEXT = 77
MEAN = (0.48145466, 0.4578275, 0.40821073)   # the CLIP image normalisation (openai/CLIP clip.py)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = CONTEXT
    hidden_act: str = "quick_gelu"   # OpenAI CLIP: x * sigmoid(1.702 x); OpenCLIP-H (SD2): exact "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407        # pooled output = the hidden state at the first end-of-text token


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPConfig:
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # None: a text-only model
    projection_dim: int = 512

    @classmethod
    def from_json(cls, path_or_dict):
        """An HF config.json: CLIPModel (text_config + vision_config) or CLIPTextModel (flat)."""
        d = path_or_dict
        if not isinstance(d, dict):
            with open(d) as f:
                d = json.load(f)
        if d.get("model_type", "clip") not in ("clip", "clip_text_model"):
            raise ValueError(f"model_type {d['model_type']!r}: not a CLIPModel or CLIPTextModel config "
                             f"(a vision-only CLIP has no text tower)")
        # files from transformers 4.1x may also hold text_config_dict / vision_config_dict, which win
        part = lambda name: {**(d.get(name) or {}), **(d.get(name + "_dict") or {})}
        text = part("text_config") if "text_config" in d or "vision_config" in d else d
        vision = part("vision_config")
        pick = lambda klass, src: klass(**{k: v for k, v in src.items() if k in {f.name for f in fields(klass)}})
        eos = text.get("eos_token_id", 49407)
        text_cfg = pick(CLIPTextConfig, {**text, "eos_token_id": 49407 if eos == 2 else eos})  # 2: legacy HF default
        return cls(text_config=text_cfg, vision_config=pick(CLIPVisionConfig, vision) if vision else None,
                   projection_dim=d.get("projection_dim", 512))

    def to_dict(self):
        """HF's config.json (transformers' CLIPModel / CLIPTextModel read it)."""
        if self.vision_config is None:
            return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(self.text_config),
                    "projection_dim": self.projection_dim}
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
                "text_config": asdict(self.text_config), "vision_config": asdict(self.vision_config)}

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


PRESETS = {
    "clip-vit-l14": CLIPConfig(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
                               CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, patch_size=14), projection_dim=768),
    "clip-vit-b16": CLIPConfig(CLIPTextConfig(), CLIPVisionConfig(patch_size=16), projection_dim=512),
    # SD2's text encoder: OpenCLIP ViT-H/14 text tower, 23 of 24 layers (the penultimate layer), GELU.
    "sd2-text": CLIPConfig(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, hidden_act="gelu"), None, projection_dim=512),
}


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask=None):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class MLP(nn.Module):
    def __init__(self, dim, inner, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, inner), nn.Linear(inner, dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(d, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        """ids (B, L) -> (hidden (B, L, D) after the final LN, pooled (B, D) at the first end token)."""
        L = ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()  # token i sees tokens <= i
        x = self.final_layer_norm(self.encoder(self.embeddings(ids), causal))
        is_eos = (ids == self.eos_token_id).int()
        first = torch.where(is_eos.any(1), is_eos.argmax(1), torch.full_like(ids[:, 0], L - 1))
        return x, x[torch.arange(len(ids), device=ids.device), first]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d)

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, D, g, g) -> (B, N, D)
        cls = self.class_embedding.expand(len(x), 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, HF's name
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        """pixels (B, 3, S, S) -> tokens (B, 1 + N, D) after post-LN (class token first)."""
        return self.post_layernorm(self.encoder(self.pre_layrnorm(self.embeddings(pixels))))


class CLIP(nn.Module):
    """Text and vision towers with their projections into the shared embedding space."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text_config)
        self.vision_model = VisionTransformer(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07)
        self.tokenizer = None   # a Tokenizer, attached by the loader

    def text(self, ids):
        """ids (B, 77) -> (hidden (B, 77, D) after the final LN, pooled embedding (B, E) projected)."""
        hidden, pooled = self.text_model(ids)
        return hidden, self.text_projection(pooled)

    def image(self, pixels):
        """pixels (B, 3, S, S) -> (pooled embedding (B, E), patch embeddings (B, N, E)).
        The patch tokens go through the same post-LN and projection as the class token, so they live
        in the text embedding space: App. A.3 compares them with class prompts."""
        tokens = self.visual_projection(self.vision_model(pixels))
        return tokens[:, 0], tokens[:, 1:]

    def preprocess(self, image):
        return preprocess(image, self.config.vision_config.image_size)


class CLIPTextModel(nn.Module):
    """A text tower alone (SD2's text encoder): forward(ids) -> hidden (B, 77, D) after the final LN."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text_config)

    def forward(self, ids):
        return self.text_model(ids)[0]


def preprocess(image, size=224):
    """A PIL image of any mode -> (3, size, size): bicubic resize of the shorter side, centre crop,
    RGB in [0, 1], then CLIP's mean/std (as openai/CLIP's _transform and HF's CLIPImageProcessor)."""
    image = image.convert("RGB")
    w, h = image.size
    s = size / min(w, h)
    image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    x = torch.tensor(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def views(image, size=224):
    """The whole of a PIL image, as CLIP sees it for class proposals (App. A.3) -> (whole, tiles).

    CLIP's own `preprocess` crops the centre square, so the outer parts of a wide image (the left
    and right quarters of a 2:1 street scene) never reach the vision tower, and a class seen only
    there could not be proposed. Our reading of App. A.3, which compares the image embedding and
    the patch embeddings with the class prompts: the image embedding comes from `whole`, the image
    padded to a square with CLIP's mean colour (zero after normalisation) and resized to size x
    size (1, 3, S, S); the patch embeddings come from `tiles` (n, 3, S, S), squares of the short
    side that together cover the image (overlapping where the long side is not a multiple of the
    short one), each resized to size x size, so that every pixel reaches a patch at CLIP's usual
    scale. A square image is its own single tile, and both views equal `preprocess` (n = 1)."""
    image = image.convert("RGB")
    w, h = image.size
    side, long = min(w, h), max(w, h)
    n = math.ceil(long / side)
    starts = [round(i * (long - side) / (n - 1)) for i in range(n)] if n > 1 else [0]
    boxes = [(s, 0, s + side, side) if w >= h else (0, s, side, s + side) for s in starts]
    tiles = torch.stack([preprocess(image.crop(box), size) for box in boxes])
    square = Image.new("RGB", (long, long), tuple(round(255 * m) for m in MEAN))
    square.paste(image, ((long - w) // 2, (long - h) // 2))
    return preprocess(square, size)[None], tiles


# ---- the tokenizer -------------------------------------------------------------------------------

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py), applied case-insensitively there;
# here the text is lowercased first, so the plain pattern gives the same pieces.
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pipeline(bpe):
    tok = BPETokenizer(bpe)
    # The original also runs ftfy.fix_text and html.unescape twice; without them, text with HTML
    # entities ("&amp;") or mojibake tokenizes differently. Plain, unicode and emoji text agree.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def read_openai_merges(bpe_gz):
    """The 48894 merge lines ("a b") of OpenAI's bpe_simple_vocab_16e6.txt.gz (after its header line)."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[1:49152 - 256 - 2 + 1]


class Tokenizer:
    """CLIP's byte-level BPE ("</w>" marks the end of a word) on the `tokenizers` library.

    tokenizer(list_of_str) -> LongTensor (B, 77): <|startoftext|> ids <|endoftext|> pad...; a text
    longer than 77 tokens is cut and its last id forced to <|endoftext|> (as clip.tokenize(truncate=True)).
    Padding: HF CLIP folders pad with <|endoftext|> (49407); SD2's tokenizer and OpenAI's
    clip.tokenize pad with id 0, which is "!". The pad token only fills: a "!" in the text stays
    "!</w>" (256) as in open_clip, the tokenizer SD2 was trained with, whereas transformers'
    CLIPTokenizer with pad_token="!" makes "!" special and turns every "!" of the text into id 0."""

    def __init__(self, vocab, merges, pad_token=EOT, context=CONTEXT):
        bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                         fuse_unk=False, unk_token=EOT)
        self.tok = _pipeline(bpe)
        self.sot, self.eot = vocab[SOT], vocab[EOT]
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad, self.context, self.vocab_size = vocab[pad_token], context, len(vocab)

    @classmethod
    def from_files(cls, vocab_json, merges_txt, pad_token=EOT):
        """HF / SD2 tokenizer files: vocab.json (token -> id) and merges.txt ("#version" header)."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab, read_merges(merges_txt), pad_token)

    @classmethod
    def from_tokenizer_json(cls, path, pad_token=EOT):
        """A `tokenizers` tokenizer.json (what current transformers saves alone): its BPE model's
        vocab and merges, the merges as "a b" strings or as [a, b] pairs (newer files)."""
        with open(path, encoding="utf-8") as f:
            bpe = json.load(f).get("model", {})
        if bpe.get("type", "BPE") != "BPE" or "vocab" not in bpe or "merges" not in bpe:
            raise ValueError(f"{path}: expected a BPE model with vocab and merges")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
        return cls(bpe["vocab"], merges, pad_token)

    @classmethod
    def from_openai(cls, bpe_gz, pad_token="!"):
        """OpenAI's bpe_simple_vocab_16e6.txt.gz: 48894 merges; the vocabulary is rebuilt from them:
        256 byte characters, the same with "</w>", one token per merge, then the two specials (49408)."""
        merges = [tuple(ln.split()) for ln in read_openai_merges(bpe_gz)]
        chars = list(bytes_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token)

    def encode(self, text):
        return [self.sot] + self.tok.encode(text, add_special_tokens=False).ids + [self.eot]

    def token_counts(self, texts):
        """Ids per text with the start and end tokens, before truncation (> 77 means truncated)."""
        return [len(self.encode(t)) for t in texts]

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context), self.pad, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            if len(ids) > self.context:
                ids = ids[: self.context - 1] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def read_merges(merges_txt):
    """merges.txt (after its "#version" header, one "a b" pair a line) -> [(a, b), ...] in merge order."""
    with open(merges_txt, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    return [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]


def train_bpe(texts, vocab_size, out_dir):
    """Train a CLIP-style BPE vocabulary on `texts` with the tokenizers library (the toy world) and
    write vocab.json + merges.txt, as an HF CLIP folder holds them. Returns the Tokenizer."""
    tok = _pipeline(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOT))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SOT, EOT], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.model.save(os.fspath(out_dir))
    vocab_json, merges_txt = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    # The trainer numbers the end-of-word characters ("a</w>") in hash-map order, a new order in every
    # run (huggingface/tokenizers#1794), and the toy CLIP's embedding rows follow the ids. Renumbered
    # so that one corpus gives one vocabulary: the special tokens, then every token no merge makes in
    # sorted order, then the merges' products in merge order. The merges themselves are unchanged.
    products = [a + b for a, b in read_merges(merges_txt)]
    with open(vocab_json, encoding="utf-8") as f:
        tokens = set(json.load(f))
    order = [SOT, EOT] + sorted(tokens - set(products) - {SOT, EOT}) + products
    with open(vocab_json, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(order)}, f, ensure_ascii=False)
    return Tokenizer.from_files(vocab_json, merges_txt)
