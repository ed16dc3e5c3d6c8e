"""The BPE tokenizer against transformers' CLIPTokenizer on the real vocabulary (open_clip_torch's
bpe_simple_vocab_16e6.txt.gz, installed by .ci/run with --no-deps): identical ids and padding."""
import pytest
import torch

from model.clip import Tokenizer
from tests.test_clip import VOCAB, write_hf_vocab

pytestmark = pytest.mark.skipif(VOCAB is None, reason="open_clip_torch (the vocabulary) is not installed")

BASE = ["a photo of a cat.", "A Photo Of A CAT!", "", " ", "   leading and trailing   ", "tabs\tand\nnewlines",
        "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "rock'n'roll", "3.14159", "1,000,000 people",
        "année", "naïve café", "Straße", "Ελληνικά", "русский текст", "日本語のテキスト", "中文", "한국어", "emoji 🐈‍⬛ 🚀 👍🏽",
        "punctuation!!! ??? ... ;;; :-) (a) [b] {c}", "hyphen-ated words", "under_score", "e-mail@example.com",
        "#hashtag", "$100 & 50%", "x" * 300, "the " * 100, "a photo of a " + "very " * 80 + "big dog",
        "tv-monitor", "potted plant", "sky, clouds", "traffic light", "fire hydrant", "COCO-Stuff", "ADE20K"]
CLASSES = ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
           "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
           "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
           "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
           "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
           "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
           "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
           "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel"]
TEXTS = BASE + [f"A photo of a {c}." for c in CLASSES] + [f"a {c} in the scene" for c in CLASSES]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import CLIPTokenizer
    folder = tmp_path_factory.mktemp("tok")
    write_hf_vocab(VOCAB, folder)
    ref = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ref_bang = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    return Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt"), Tokenizer.from_openai(VOCAB), ref, ref_bang


def reference_ids(ref, texts):
    out = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    return out


def test_at_least_200_strings():
    assert len(TEXTS) >= 200


def test_ids_and_padding_match_transformers(pair):
    ours, ours_openai, ref, ref_bang = pair
    expected = reference_ids(ref, TEXTS)
    got = ours(TEXTS)
    bad = [t for t, a, b in zip(TEXTS, got, expected) if not torch.equal(a, b)]
    assert not bad, bad[:5]
    # the same vocabulary rebuilt from the OpenAI merges file, padded with "!" = 0 (SD2, clip.tokenize)
    plain = [t for t in TEXTS if "!" not in t]
    expected0 = reference_ids(ref_bang, plain)
    assert (expected0 == 0).any() and torch.equal(ours_openai(plain), expected0)
    # transformers makes its pad token special, so with pad "!" it also turns every "!" of the text
    # into id 0; open_clip (SD2's training tokenizer) and we byte-pair encode it: "!</w>" = 256
    assert reference_ids(ref_bang, ["a cat!"])[0, :5].tolist() == [49406, 320, 2368, 0, 49407]
    assert ours_openai(["a cat!"])[0, :5].tolist() == [49406, 320, 2368, 256, 49407]


def test_truncation_keeps_the_end_token(pair):
    ours = pair[0]
    long = "a photo of a " + "very " * 100 + "big dog"
    ids = ours([long])[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 49407).sum() == 76
    assert ours.token_counts([long])[0] > 77 and ours.token_counts(["a cat"]) == [4]


def test_known_ids(pair):
    ours_openai = pair[1]
    # open_clip.tokenize("a diagram") -> [49406, 320, 22697, 49407, 0, ...] (FACTS.md: the padding of SD2)
    ids = ours_openai(["a diagram", "a photo of a cat"])
    assert ids[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    assert ids[1, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]   # open_clip.tokenize, FACTS.md 1
    assert ours_openai.vocab_size == 49408


def test_tokenizer_json_alone_gives_the_same_ids(pair, tmp_path):
    """A tokenizer folder saved by current transformers holds tokenizer.json (+ tokenizer_config.json)
    and no vocab.json / merges.txt; both merge spellings of tokenizer.json ("a b" and [a, b])."""
    import json
    import os

    from transformers import CLIPTokenizer

    from model.weights import _hf_tokenizer
    ours = pair[0]
    src = tmp_path / "src"
    src.mkdir()
    write_hf_vocab(VOCAB, src)
    saved = tmp_path / "saved"
    CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt")).save_pretrained(saved)
    for name in ("vocab.json", "merges.txt"):
        if os.path.exists(saved / name):
            os.remove(saved / name)
    assert os.path.isfile(saved / "tokenizer.json")
    from_json = _hf_tokenizer(str(saved))
    assert torch.equal(from_json(TEXTS), ours(TEXTS))
    doc = json.load(open(saved / "tokenizer.json", encoding="utf-8"))
    merges = doc["model"]["merges"]
    doc["model"]["merges"] = [m.split(" ") if isinstance(m, str) else " ".join(m) for m in merges]   # the other spelling
    other = tmp_path / "other"
    other.mkdir()
    json.dump(doc, open(other / "tokenizer.json", "w", encoding="utf-8"))
    assert torch.equal(_hf_tokenizer(str(other))(TEXTS), ours(TEXTS))
