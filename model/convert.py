"""The other formats' tensors renamed to ours (STYLE.md habit 1: a second format is one short
declarative table plus a few named tensor transforms): the original single-file Stable Diffusion
checkpoints (LDM names), diffusers' older VAE attention names, OpenAI's CLIP checkpoints (TorchScript
archives, read without running their code) and SD2's OpenCLIP text tower. model/weights.py loads
them; what our modules are named after, diffusers and HF transformers, needs no converter."""
import collections
import io
import pickle
import zipfile

import torch

from model.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from model.files import WeightsError, _listing, read_state_dict
from model.unet import PRESETS as UNET_PRESETS
from model.vae import PRESETS as VAE_PRESETS


# Original LDM names (Stability-AI/stablediffusion ldm/modules) -> diffusers names, as
# prefix tables: the longest matching dotted prefix of a key is replaced (FACTS.md section 3).
LDM_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
LDM_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
LDM_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def _ldm_unet_table(cfg):
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block.1": "mid_block.attentions.0",
             "out.0": "conv_norm_out", "out.2": "conv_out"}
    _add(table, "middle_block.0", "mid_block.resnets.0", LDM_UNET_RESNET)
    _add(table, "middle_block.2", "mid_block.resnets.1", LDM_UNET_RESNET)
    i = 1  # input_blocks.0 is conv_in; then n (resnet, attention) pairs and a downsampler per level
    for level in range(levels):
        for j in range(n):
            _add(table, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", LDM_UNET_RESNET)
            table[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level < levels - 1:
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            i += 1
    for i in range(levels * (n + 1)):  # output block i = [resnet, attention?, upsampler?]
        level, j = divmod(i, n + 1)
        cross = cfg.up_block_types[level] == "CrossAttnUpBlock2D"
        _add(table, f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}", LDM_UNET_RESNET)
        if cross:
            table[f"output_blocks.{i}.1"] = f"up_blocks.{level}.attentions.{j}"
        if j == n and level < levels - 1:
            table[f"output_blocks.{i}.{2 if cross else 1}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    return table


def _ldm_vae_table(cfg):
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    for part in ("encoder", "decoder"):
        _add(table, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", LDM_VAE_RESNET)
        _add(table, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", LDM_VAE_ATTENTION)
        _add(table, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", LDM_VAE_RESNET)
    for level in range(levels):
        for j in range(n):
            _add(table, f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", LDM_VAE_RESNET)
        table[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = levels - 1 - level  # the LDM decoder numbers its levels from the lowest resolution up
        for j in range(n + 1):
            _add(table, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", LDM_VAE_RESNET)
        table[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return table


def _add(table, ldm, ours, subkeys=None):
    table[ldm] = ours
    for a, b in (subkeys or {}).items():
        table[f"{ldm}.{a}"] = f"{ours}.{b}"


def _rename(key, table):
    """Replace the longest dotted prefix of `key` that `table` holds; other keys stay as they are."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return key


def conv1x1_to_linear(w):
    """A 1x1 conv weight (out, in, 1, 1) -> a Linear weight (out, in); other tensors unchanged."""
    return w[:, :, 0, 0] if w.ndim == 4 else w


def convert_ldm_unet(sd, config=UNET_PRESETS["sd2-base"]):
    """The `model.diffusion_model.*` tensors of an original checkpoint, in diffusers names.
    EMA copies (`model_ema.*`) are ignored: the released SD2 files already hold the EMA weights."""
    table, prefix = _ldm_unet_table(config), "model.diffusion_model."
    return {_rename(k[len(prefix):], table): v for k, v in sd.items() if k.startswith(prefix)}


def convert_ldm_vae(sd, config=VAE_PRESETS["sd2-base"]):
    """The `first_stage_model.*` tensors of an original checkpoint, in diffusers names; the mid-block
    attention's 1x1 conv weights become Linear weights."""
    table, prefix = _ldm_vae_table(config), "first_stage_model."
    out = {_rename(k[len(prefix):], table): v for k, v in sd.items() if k.startswith(prefix)}
    return {k: conv1x1_to_linear(v) if ".attentions." in k else v for k, v in out.items()}


def convert_old_vae_attention(sd):
    """A diffusers VAE state dict with the old attention names (query/key/value/proj_attn, possibly
    1x1 conv weights) -> the current names; a current state dict is returned unchanged."""
    table = {f"{part}.mid_block.attentions.0.{a}": f"{part}.mid_block.attentions.0.{b}"
             for part in ("encoder", "decoder") for a, b in OLD_VAE_ATTENTION.items()}
    out = {_rename(k, table): v for k, v in sd.items()}
    return {k: conv1x1_to_linear(v) if ".attentions." in k else v for k, v in out.items()}


# ---- CLIP: OpenAI checkpoints and SD2's OpenCLIP text tower

def read_openai_checkpoint(path):
    """The tensors of an OpenAI .pt file, by their dotted attribute names, without running TorchScript.

    OpenAI's ViT-*.pt files are TorchScript archives (a zip: <name>/data.pkl, <name>/data/N,
    <name>/code/..., constants.pkl). torch.load(weights_only=True) refuses them, and torch.jit.load
    would compile the archive's code. We read data.pkl alone with an unpickler that resolves only:
    the TorchScript module classes (`__torch__.*`), to an inert record of their attributes; the
    storage type names, to dtypes; the tensor rebuild function, to our own as_strided view of the
    raw bytes in data/N; and OrderedDict. Any other name in the pickle is refused, so nothing from
    the file is imported or called. It gives exactly torch.jit.load(f).state_dict() on traced and
    scripted archives written by torch 2.13 (tests/test_clip.py); the released files (torch 1.7 era)
    share the zip layout but were not available here to check. Plain state-dict files go through
    weights_only=True."""
    if not zipfile.is_zipfile(path):
        return read_state_dict(path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        roots = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1 or not any(n.startswith(roots[0] + "code/") for n in names):
            return read_state_dict(path)    # a torch.save zip, not TorchScript
        if roots[0] + "byteorder" in names and z.read(roots[0] + "byteorder").strip() != b"little":
            raise WeightsError(f"{path}: a big-endian TorchScript archive is not supported")
        try:
            root = _TorchScriptUnpickler(z, roots[0], path).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError) as e:
            raise WeightsError(f"{path}: a TorchScript archive whose data.pkl cannot be read: {e}") from e
    return dict(_script_tensors(root))


STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands in for a TorchScript module of data.pkl: keeps the attributes it is built with."""

    def __setstate__(self, state):
        self.attributes = state


def _rebuild_tensor(storage, offset, size, stride, *unused):   # torch._utils._rebuild_tensor_v2's arguments
    return storage.as_strided(size, stride, offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, z, root, path):
        super().__init__(io.BytesIO(z.read(root + "data.pkl")))
        self.z, self.root, self.path, self.storages = z, root, path, {}

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise WeightsError(f"{self.path}: data.pkl refers to {module}.{name}, which a file of weights does not "
                           f"need; refusing to load it")

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel) -> the raw bytes of data/<key> as a flat tensor."""
        _, dtype, key, _, _ = pid
        if key not in self.storages:
            raw = bytearray(self.z.read(f"{self.root}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _script_tensors(obj, prefix=""):
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):
            yield from _script_tensors(value, f"{prefix}{name}.")


def openai_clip_config(sd, where="OpenAI CLIP"):
    """The architecture of an OpenAI checkpoint, read off its tensor shapes (as openai/CLIP does)."""
    needed = ["ln_final.weight", "token_embedding.weight", "positional_embedding", "text_projection",
              "visual.conv1.weight", "visual.positional_embedding"]
    if any(k not in sd for k in needed):
        raise WeightsError(f"{where}: not a full OpenAI CLIP checkpoint: missing {_listing([k for k in needed if k not in sd])}")
    width = sd["ln_final.weight"].shape[0]
    vwidth, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    layers = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    text = CLIPTextConfig(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width,
                          intermediate_size=4 * width, num_hidden_layers=layers("transformer.resblocks."),
                          num_attention_heads=width // 64, max_position_embeddings=sd["positional_embedding"].shape[0])
    vision = CLIPVisionConfig(hidden_size=vwidth, intermediate_size=4 * vwidth,
                              num_hidden_layers=layers("visual.transformer.resblocks."),
                              num_attention_heads=vwidth // 64, image_size=grid * patch, patch_size=patch)
    return CLIPConfig(text, vision, projection_dim=sd["text_projection"].shape[1])


# OpenAI / OpenCLIP name -> HF name, per transformer block and for the tower ends.
CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CLIP_TEXT_ENDS = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias"}
CLIP_VISION_ENDS = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                    "visual.class_embedding": "vision_model.embeddings.class_embedding",
                    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
                    "logit_scale": "logit_scale"}
CLIP_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def _convert_blocks(sd, src, dst):
    """transformer.resblocks.N.* -> encoder.layers.N.*; the fused in_proj (rows q | k | v) is split."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        n, rest = k[len(src):].split(".", 1)
        base = f"{dst}.encoder.layers.{n}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]                   # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part
        else:
            module, kind = rest.rsplit(".", 1)
            if module not in CLIP_BLOCK:
                raise WeightsError(f"unexpected key {k}: not a CLIP transformer block tensor")
            out[base + CLIP_BLOCK[module] + "." + kind] = v
    return out


# Integer tensors the JIT files carry besides the weights (openai/CLIP build_model deletes them too).
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def convert_openai_clip(sd):
    """OpenAI CLIP names -> ours (HF). Projections are stored [in, out] (x @ P) -> Linear [out, in].
    Keys the tables do not name are an error (missing ones are reported by load_into, in HF names)."""
    ends = {**CLIP_TEXT_ENDS, **CLIP_VISION_ENDS}
    blocks = ("transformer.resblocks.", "visual.transformer.resblocks.")
    unknown = [k for k in sd if not k.startswith(blocks) and k not in ends and k not in CLIP_PROJECTIONS
               and k not in OPENAI_METADATA]
    if unknown:
        raise WeightsError(f"{len(unknown)} unexpected keys for an OpenAI CLIP checkpoint: {_listing(sorted(unknown))}")
    out = _convert_blocks(sd, "transformer.resblocks.", "text_model")
    out.update(_convert_blocks(sd, "visual.transformer.resblocks.", "vision_model"))
    out.update({new: sd[old] for old, new in ends.items() if old in sd})
    out.update({new: sd[old].t().contiguous() for old, new in CLIP_PROJECTIONS.items() if old in sd})
    return out


def convert_openclip_text(sd, prefix="cond_stage_model.model.", layers=23):
    """SD2's single-file text encoder (OpenCLIP ViT-H/14 text tower) -> our CLIPTextModel (HF names).
    SD2 conditions on the penultimate layer: resblock 23 is dropped, and so are text_projection and
    logit_scale, which the U-Net never sees."""
    text = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    text = {k: v for k, v in text.items() if not any(k.startswith(f"transformer.resblocks.{i}.") for i in range(layers, 64))}
    out = _convert_blocks(text, "transformer.resblocks.", "text_model")
    out.update({new: text[old] for old, new in CLIP_TEXT_ENDS.items()})
    return out
