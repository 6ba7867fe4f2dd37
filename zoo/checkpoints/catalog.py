"""The public pretrained checkpoints the zoo can load, by name: where each file lives,
its on-disk format, the zoo model config it fills and the input preprocessing it was
trained with. Every URL and figure comes from its publisher (the `source` field says
where); hashes are pinned only where the publisher states one.

* `Entry`: one checkpoint. `format` is "big_vision" (an npz of "a/b/c"-named arrays,
  old vit_jax or current big_vision layout), "timm" (a torch state dict of
  timm's `VisionTransformer`; DeiT's sits under "model") or "adaptive_span" (the
  authors' `save_checkpoint` dict, its state dict under "model" with DataParallel's
  "module." prefix). `model` is a config that `zoo.models.create` accepts.
* `ENTRIES`, `names()`, `get(name)` (CheckpointError with a did-you-mean), and
  `fetch(name)`: the file in the local cache, downloaded with the entry's pins
  (`zoo.checkpoints.download`).

`preprocessing` keys (images: RGB, pixels 0..255):

* `value_range`: [lo, hi], pixels mapped linearly from [0, 255] (big_vision's
  `value_range(-1, 1)`); or `mean` and `std`: per channel, on pixels scaled to [0, 1]
  ((x / 255 - mean) / std, torchvision's `Normalize`).
* `resize`: N, resize to N x N (aspect not kept; vit_jax's eval `tf.image.resize`);
  `resize_small`: N, the shorter side to N keeping the aspect (big_vision's
  `resize_small`, torchvision's `Resize(int)`); `crop`: N, then a central N x N crop;
  `interpolation`: the resize's "bilinear", "bicubic" or "area".

For the language models: `dataset`, `prep_script` (the authors' data preparation:
tokens are the training text's symbols, one per line-split word, plus "<eos>" per line),
`vocabulary` ("first_appearance": id = order of first appearance in that train.txt, so a
byte-level model needs the permutation built from the data), `block_len` and
`eval_batch_size` (the authors' evaluation).
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any

from zoo.checkpoints import download as download_lib
from zoo.checkpoints.files import CheckpointError
from zoo.config import did_you_mean

FORMATS = ("big_vision", "timm", "adaptive_span")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One public checkpoint (see the module docstring for `format` and `preprocessing`).

  `sha256` / `sha256_prefix`: the publisher's full hash or the hash prefix in a torch
  hub file name; None when the publisher states none (then downloading needs
  `allow_unpinned`). `filename`: the name in the cache when the URL's own name is too
  generic (e.g. "enwik8.pt"). `source`: where the URL and the figures come from.
  """
  name: str
  url: str
  format: str
  model: dict[str, Any]
  preprocessing: dict[str, Any]
  sha256: str | None = None
  sha256_prefix: str | None = None
  description: str = ""
  source: str = ""
  filename: str | None = None

  def cache_path(self) -> pathlib.Path:
    """Where `fetch` keeps this checkpoint (and where a copy made by hand goes)."""
    return download_lib.cache_path(self.url, self.filename)


# ---------------------------------------------------------------------------------- ViTs

_GCS = "https://storage.googleapis.com"
_VIT_README = ("google-research/vision_transformer README.md, 'Available ViT models' "
               "(commit c6de1e53)")
_BV_VANITY = "google-research/big_vision big_vision/models/vit.py VANITY_NAMES (commit 0127fb6b)"
_TIMM_CFGS = ("huggingface/pytorch-image-models timm/models/vision_transformer.py "
              "default_cfgs (commit aa4b5850)")
_AUGREG_PP_SOURCE = ("vision_transformer vit_jax/input_pipeline.py eval: "
                     "tf.image.resize(im, [image_size, image_size]) then (im - 127.5) / 127.5")
_AUGREG_MODEL_SOURCE = ("vision_transformer vit_jax/configs/models.py (classifier='token', "
                        "representation_size=None), vit_jax/models_vit.py (flax nn.gelu "
                        "(tanh), LayerNorm epsilon 1e-6, zero-initialised head)")


def _vit(variant: str, num_classes: int, *, pool_type: str, posemb: str,
         rep_size: int | bool, head_zeroinit: bool, mlp_activation: str,
         image_size: int = 224) -> dict[str, Any]:
  return {"name": "vit", "variant": variant, "num_classes": num_classes,
          "image_size": image_size, "pool_type": pool_type, "posemb": posemb,
          "rep_size": rep_size, "head_zeroinit": head_zeroinit,
          "mlp_activation": mlp_activation, "layernorm_epsilon": 1e-6}


def _augreg(variant: str, num_classes: int) -> dict[str, Any]:
  """vit_jax's AugReg ViTs: class token, learned position embedding, no pre-logits."""
  return _vit(variant, num_classes, pool_type="tok", posemb="learn", rep_size=False,
              head_zeroinit=True, mlp_activation="gelu_tanh")


_AUGREG_PP = {"value_range": [-1, 1], "resize": 224, "interpolation": "bilinear"}

# (size, i21k file as recommended by the publisher, i21k -> ImageNet-1k 224 px file).
_AUGREG = {
    "Ti/16": ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
              "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"
              "--imagenet2012-steps_20k-lr_0.03-res_224"),
    "S/16": ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
             "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"
             "--imagenet2012-steps_20k-lr_0.03-res_224"),
    "B/16": ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
             "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
             "--imagenet2012-steps_20k-lr_0.01-res_224"),
    "L/16": ("L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
             "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1"
             "--imagenet2012-steps_20k-lr_0.01-res_224"),
}
_AUGREG_TIMM = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
                "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224"}


def _augreg_entries() -> list[Entry]:
  entries = []
  for variant, (i21k, ft) in _AUGREG.items():
    short = variant.replace("/", "").lower()
    timm_name = _AUGREG_TIMM[variant]
    entries.append(Entry(
        name=f"augreg_{short}_i21k",
        url=f"{_GCS}/vit_models/augreg/{i21k}.npz",
        format="big_vision",
        model=_augreg(variant, 21843),
        preprocessing=dict(_AUGREG_PP),
        description=(
            f"ViT-{variant} pretrained on ImageNet-21k, 300 epochs ('How to train your "
            f"ViT?', arXiv 2106.10270; the publisher's recommended {variant} upstream). "
            f"The head is the trained 21843-class ImageNet-21k classifier (timm loads it "
            f"as {timm_name}.augreg_in21k with num_classes=21843); old vit_jax parameter "
            f"layout."),
        source=(f"{_VIT_README} (gs://vit_models/augreg/{i21k}.npz); "
                f"{_BV_VANITY} 'howto-i21k-{variant}'; model: {_AUGREG_MODEL_SOURCE}; "
                f"preprocessing: {_AUGREG_PP_SOURCE}")))
    upstream_note = ("" if ft.startswith(i21k) else
                     f" Its upstream ({ft.split('--')[0]}) is not the recommended i21k "
                     f"file of augreg_{short}_i21k: the publisher's README lists only a "
                     f"384 px fine-tune of that one.")
    entries.append(Entry(
        name=f"augreg_{short}_i21k_ft_i1k",
        url=f"{_GCS}/vit_models/augreg/{ft}.npz",
        format="big_vision",
        model=_augreg(variant, 1000),
        preprocessing=dict(_AUGREG_PP),
        description=(
            f"ViT-{variant} pretrained on ImageNet-21k then fine-tuned on ImageNet-1k at "
            f"224 px, 20k steps (arXiv 2106.10270).{upstream_note}"),
        source=(f"{_TIMM_CFGS} '{timm_name}.augreg_in21k_ft_in1k' url; the file naming "
                f"of {_VIT_README}; model: {_AUGREG_MODEL_SOURCE}; preprocessing: "
                f"{_AUGREG_PP_SOURCE}")))
  return entries


def _big_vision_s16_entries() -> list[Entry]:
  entries = []
  for epochs in (90, 150, 300):
    entries.append(Entry(
        name=f"bigvision_s16_i1k_{epochs}ep",
        url=f"{_GCS}/big_vision/vit_s16_i1k_{epochs}ep.npz",
        format="big_vision",
        model=_vit("S/16", 1000, pool_type="gap", posemb="sincos2d", rep_size=384,
                   head_zeroinit=True, mlp_activation="gelu_tanh"),
        preprocessing={"value_range": [-1, 1], "resize_small": 256, "crop": 224,
                       "interpolation": "area"},
        description=(
            f"big_vision's plain ViT-S/16 baseline trained on ImageNet-1k for {epochs} "
            f"epochs ('Better plain ViT baselines for ImageNet-1k', arXiv 2205.01580; "
            f"76.5% top-1 at 90 epochs per the big_vision README): global average "
            f"pooling, fixed 2-D sin-cos position embedding, a tanh pre-logits layer "
            f"(rep_size=True, i.e. width 384)."),
        source=(f"{_BV_VANITY} 'i1k-s16-{epochs}ep' (gs://big_vision/vit_s16_i1k_"
                f"{epochs}ep.npz, served at storage.googleapis.com); model: big_vision "
                f"configs/vit_s16_i1k.py (variant S/16, rep_size=True, pool_type='gap', "
                f"posemb='sincos2d') and configs/transfer.py 'vit-s16'; big_vision "
                f"models/vit.py (nn.gelu, LayerNorm 1e-6, head zero-init by default); "
                f"preprocessing: vit_s16_i1k.py pp_eval 'decode|resize_small(256)|"
                f"central_crop(224)|value_range(-1, 1)', pp/ops_image.py resize_small "
                f"method 'area'")))
  return entries


_DEIT = {  # name: (variant, the sha256 prefix in the file name, ImageNet top-1)
    "deit_tiny_patch16_224": ("Ti/16", "a1311bcf", 72.2),
    "deit_small_patch16_224": ("S/16", "cd65a155", 79.9),
    "deit_base_patch16_224": ("B/16", "b5f2ef4d", 81.8),
}


def _deit_entries() -> list[Entry]:
  entries = []
  for name, (variant, prefix, top1) in _DEIT.items():
    entries.append(Entry(
        name=name,
        url=f"https://dl.fbaipublicfiles.com/deit/{name}-{prefix}.pth",
        format="timm",
        model=_vit(variant, 1000, pool_type="tok", posemb="learn", rep_size=False,
                   head_zeroinit=False, mlp_activation="gelu"),
        preprocessing={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "resize_small": 256, "crop": 224, "interpolation": "bicubic"},
        sha256_prefix=prefix,
        description=(
            f"DeiT ViT-{variant} trained on ImageNet-1k only (arXiv 2012.12877; "
            f"{top1}% top-1 per the DeiT README); timm VisionTransformer layout (fused "
            f"qkv, class token row in pos_embed), the state dict under 'model', exact "
            f"(erf) GELU, LayerNorm epsilon 1e-6."),
        source=(f"facebookresearch/deit models.py {name} (url, torch.hub "
                f"load_state_dict_from_url(check_hash=True): the sha256 starts with the "
                f"file name's {prefix}; checkpoint['model']; LayerNorm eps 1e-6) and "
                f"README_deit.md (commit 7e160fe4); preprocessing: deit datasets.py "
                f"build_transform eval (Resize(int(224 / 0.875)=256, bicubic), "
                f"CenterCrop(224), Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))")))
  return entries


# ---------------------------------------------------------------------- adaptive span

_ADASPAN_URL = "https://dl.fbaipublicfiles.com/adaptive-span"
_ADASPAN_PREP = {
    "enwik8": "https://raw.githubusercontent.com/salesforce/awd-lstm-lm/master/data/"
              "enwik8/prep_enwik8.py",
    "text8": "https://raw.githubusercontent.com/kimiyoung/transformer-xl/master/prep_text8.py",
}
# The authors' vocabulary is data.py's Dictionary over train.txt: its symbols plus
# "<eos>". enwik8 (prep_enwik8.py: byte values as words, newlines as line ends): the 204
# distinct non-newline bytes of the training split (Transformer-XL reports 204 unique
# tokens for the same file) + "<eos>"; text8 (prep_text8.py: one line, spaces as "_"):
# a-z and "_" + "<eos>".
_ADASPAN_VOCAB = {"enwik8": 205, "text8": 28}
_ADASPAN = {  # name: (dataset, layers, hidden, inner, heads, span, dropout, params)
    "enwik8": ("enwik8", 12, 512, 2048, 8, 8192, 0.3, "38M"),
    "enwik8_large": ("enwik8", 24, 768, 4096, 8, 8192, 0.4, "209M"),
    "text8": ("text8", 12, 512, 2048, 8, 8192, 0.3, "39M"),
    "text8_large": ("text8", 24, 768, 4096, 8, 8192, 0.4, "209M"),
}


def _adaptive_span_entries() -> list[Entry]:
  entries = []
  for key, (data, layers, hidden, inner, heads, span, dropout, params) in _ADASPAN.items():
    entries.append(Entry(
        name=f"adaptive_span_{key}",
        url=f"{_ADASPAN_URL}/{key}.pt",
        format="adaptive_span",
        model={"name": "transformer_seq", "vocab_size": _ADASPAN_VOCAB[data],
               "width": hidden, "depth": layers, "num_heads": heads, "max_span": span,
               "inner_size": inner, "dropout": dropout, "emb_dropout": 0.0,
               "attention": "adaptive_span",
               "attention_options": {"ramp": 32, "span_init": 0.0, "span_loss": 5e-7,
                                     "adapt_cache": True}},
        preprocessing={"dataset": data, "prep_script": _ADASPAN_PREP[data],
                       "vocabulary": "first_appearance", "block_len": 512,
                       "eval_batch_size": 8},
        description=(
            f"The adaptive-span authors' {layers}-layer {data} character LM "
            f"(Sukhbaatar et al. 2019, arXiv 1905.07799; {params} parameters per their "
            f"README): hidden {hidden}, {heads} heads, ff {inner}, span limit {span}, "
            f"adaptive span with adaptive cache. A torch pickle {{iter_no, model, "
            f"optimizer, logger, scheduler_iter}}; vocabulary size derived from the "
            f"authors' data pipeline (check it against in_emb.weight)."),
        source=(f"facebookresearch/adaptive-span get_pretrained.sh (url) and "
                f"experiments/{key}.sh (--nlayers {layers} --hid-sz {hidden} "
                f"--inner-hid-sz {inner} --nheads {heads} --attn-span {span} "
                f"--block-sz 512 --dropout {dropout} --adapt-span --adapt-span-loss "
                f"0.0000005 --adapt-span-cache; eval --batch-sz 8), config.py defaults "
                f"(--adapt-span-ramp 32, --adapt-span-init 0, --emb-dropout 0), data.py "
                f"and get_data.sh (vocabulary) (commit 27b815fe)"),
        filename=f"adaptive_span_{key}.pt"))
  return entries


ENTRIES: dict[str, Entry] = {e.name: e for e in (
    _augreg_entries() + _big_vision_s16_entries() + _deit_entries()
    + _adaptive_span_entries())}


def names() -> list[str]:
  """The catalog's checkpoint names, sorted."""
  return sorted(ENTRIES)


def get(name: str) -> Entry:
  """The entry called `name` (a copy: changing it leaves the catalog as it is).

  Raises CheckpointError naming the closest names and listing them all.
  """
  if name not in ENTRIES:
    raise CheckpointError(f"no pretrained checkpoint {name!r}"
                          f"{did_you_mean([name], ENTRIES)}; known: {', '.join(names())}")
  return copy.deepcopy(ENTRIES[name])


def fetch(name: str, *, allow_unpinned: bool = False, progress: bool = True) -> pathlib.Path:
  """The local path of checkpoint `name`, downloaded into the cache first if needed, its
  hash checked against the entry's pin (see `zoo.checkpoints.download.download`)."""
  entry = get(name)
  return download_lib.download(entry.url, sha256=entry.sha256,
                               sha256_prefix=entry.sha256_prefix, filename=entry.filename,
                               allow_unpinned=allow_unpinned, progress=progress)


__all__ = ["Entry", "ENTRIES", "FORMATS", "names", "get", "fetch"]
