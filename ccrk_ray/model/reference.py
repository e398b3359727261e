"""Import checkpoints written by the CCRK reference code (BUAADreamer/CCRK, the CCLM / X-VLM design).

Two files come out of it: pre-training's ``model_state_epoch_*.th`` (``Pretrain.py``: the model's
state dict under ``model`` beside optimizer, scheduler and RNG states, or the state dict alone)
and fine-tuning's ``checkpoint_best.pth`` (``{'model', 'config'}``). Both name their weights
after the reference modules:

    vision_encoder.*                      Microsoft's Swin (patch merging at the end of a stage)
    text_encoder.[bert.]embeddings.*      XLM-R embeddings (``bert.`` in pre-training's MaskedLM)
    text_encoder.[bert.]encoder.layer.N.* text layers, then fusion layers (``crossattention``)
    text_encoder.cls.predictions.*        the MLM head (pre-training only)
    vision_proj, text_proj, temp, itm_head.{0,1,3}

``import_checkpoint`` maps them onto a ``CCRKModel`` built to compute what the reference computes:
timm's Swin (its own converter moves the patch merging and resizes relative-position tables),
text layers and fusion layers (self-attention, cross-attention over the 1024-wide image tokens,
feed-forward, post-LayerNorm), position ids 0..L-1 on every caption, CLIP's pixel mean/std, and
the reference's caption normalisation (``pre_caption``) in the saved preprocessing.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.models.swin_transformer import checkpoint_filter_fn
from transformers import AutoConfig

from ccrk_ray.core.config import ConfigError, first_line
from ccrk_ray.core.log import get_logger
from ccrk_ray.data.tokenizer import CaptionTokenizer
from ccrk_ray.model.ccrk import CCRKModel, ModelConfig
from ccrk_ray.model.saved import Preprocess, save_model_dir

log = get_logger(__name__)

# The reference normalises images with CLIP's statistics (dataset/__init__.py)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# configs/config_swinB_224.json: CCR-10-2M / CCR-10-3M's vision encoder
SWIN_B_224 = {"vision_width": 1024, "image_res": 224, "window_size": 7, "embed_dim": 128,
              "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}
SWIN_NAME = "swin_base_patch4_window7_224"          # timm's Swin; the JSON's values override its shape
SWIN_DROP_PATH = 0.1                                 # the reference builds every Swin with it
# xlm-roberta-large's config.json, of which the reference keeps 12 layers (text 6 + fusion 6)
XLMR_LARGE = {"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 1024, "num_attention_heads": 16,
              "intermediate_size": 4096, "max_position_embeddings": 514, "type_vocab_size": 1,
              "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
DEFAULT_TOKENIZER = "xlm-roberta-large"
# Pretrain_3m.yaml and the task configs: max_tokens 40 (80 for xFlickr&CO / WIT), max_words 40
DEFAULT_MAX_TOKENS = 40
DEFAULT_MAX_WORDS = 40

LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.*)")
# Buffers of the reference modules that carry no learned value
IGNORED = re.compile(r"(^|\.)(position_ids|relative_position_index|attn_mask)$")
# Pieces of a BERT layer and the fusion layer's name for them (q/k/v are handled apart)
FUSION_PARTS = {"attention.output.dense": "self_attn.out_proj", "attention.output.LayerNorm": "self_norm",
                "crossattention.output.dense": "cross_attn.out_proj", "crossattention.output.LayerNorm": "cross_norm",
                "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
HEADS = {"vision_proj.": "vision_proj.", "text_proj.": "text_proj.", "itm_head.0.": "itm_head.net.0.",
         "itm_head.1.": "itm_head.net.1.", "itm_head.3.": "itm_head.net.3."}
MLM_PARTS = {"cls.predictions.transform.dense.": "mlm_head.dense.",
             "cls.predictions.transform.LayerNorm.": "mlm_head.norm.", "cls.predictions.bias": "mlm_head.bias"}


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, the training config saved with it or {}) of a reference checkpoint.

    Tensors, numbers and strings load without running pickled code (``weights_only``); a file that
    also holds other objects (pre-training's numpy RNG state) needs ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path} holds objects beyond tensors ({first_line(exc)[:160]}); loading it runs "
                          "pickled code: pass --trust-pickle if you trust the file") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path}: a checkpoint is a dict, found {type(obj).__name__}")
    state = obj.get("model", obj)
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("text_encoder.") for k in tensors) or not any(k.startswith("vision_encoder.")
                                                                           for k in tensors):
        raise ConfigError(f"{path}: not a CCRK/CCLM checkpoint (no text_encoder.* and vision_encoder.* weights)")
    return tensors, dict(config)


def text_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """``text_encoder.bert.`` (pre-training's MaskedLM) or ``text_encoder.`` (fine-tuning)."""
    return "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in state) else "text_encoder."


def text_layout(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(layers, index of the first fusion layer) of the checkpoint's text encoder."""
    prefix = text_prefix(state)
    layers, fusion = set(), set()
    for k in state:
        m = LAYER.match(k[len(prefix):]) if k.startswith(prefix) else None
        if m:
            layers.add(int(m.group(1)))
            if m.group(2).startswith("crossattention."):
                fusion.add(int(m.group(1)))
    if not layers or not fusion:
        raise ConfigError("the checkpoint's text encoder has no layers with cross-attention: not a CCRK/CCLM model")
    if sorted(layers) != list(range(len(layers))) or sorted(fusion) != list(range(min(fusion), len(layers))):
        raise ConfigError(f"text layers {sorted(layers)} with cross-attention in {sorted(fusion)}: not the "
                          "text-then-fusion layout of CCLM/X-VLM")
    return len(layers), min(fusion)


def text_config_dict(text_config: str | None) -> dict[str, Any]:
    """The text encoder's Hugging Face config: a name or folder, or xlm-roberta-large's by default."""
    if text_config is None:
        return dict(XLMR_LARGE)
    try:
        cfg = AutoConfig.from_pretrained(text_config, trust_remote_code=False).to_dict()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--text-config {text_config}: cannot be loaded ({first_line(exc)})") from None
    for k in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    return cfg


def vision_config_dict(vision_config: str | Path | None) -> dict[str, Any]:
    """The reference's Swin JSON (``configs/config_swinB_224.json`` by default)."""
    if vision_config is None:
        return dict(SWIN_B_224)
    try:
        d = json.loads(Path(vision_config).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--vision-config {vision_config}: {first_line(exc)}") from None
    missing = [k for k in ("image_res", "window_size", "embed_dim", "depths", "num_heads") if k not in d]
    if missing:
        raise ConfigError(f"--vision-config {vision_config}: no {', '.join(missing)} (a Swin config of the "
                          "reference code has image_res, window_size, embed_dim, depths, num_heads)")
    return d


def model_config(state: Mapping[str, torch.Tensor], vision: Mapping[str, Any],
                 text: Mapping[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` that computes what the reference model of ``state`` computes."""
    layers, first_fusion = text_layout(state)
    vision_kwargs = dict(img_size=vision["image_res"], window_size=vision["window_size"],
                         embed_dim=vision["embed_dim"], depths=tuple(vision["depths"]),
                         num_heads=tuple(vision["num_heads"]), drop_path_rate=SWIN_DROP_PATH)
    return ModelConfig(vision_name=SWIN_NAME, vision_kwargs=vision_kwargs,
                       text_config={**text, "num_hidden_layers": layers}, text_layers=first_fusion,
                       fusion_layers=layers - first_fusion, cross_proj=False, text_positions="from_zero",
                       fusion_dropout=float(text.get("hidden_dropout_prob", 0.1)),
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                       embed_dim=int(state["vision_proj.weight"].shape[0]))


def _layer_weights(layer: Mapping[str, torch.Tensor], fusion_prefix: str) -> dict[str, torch.Tensor]:
    """One reference fusion layer's weights under ``FusionLayer``'s names."""
    out = {}
    for block, ours in (("attention.self.", "self_attn."), ("crossattention.self.", "cross_attn.")):
        q, k, v = (layer.pop(f"{block}{n}.weight") for n in ("query", "key", "value"))
        biases = [layer.pop(f"{block}{n}.bias") for n in ("query", "key", "value")]
        if q.shape == k.shape == v.shape:
            out[f"{fusion_prefix}{ours}in_proj_weight"] = torch.cat([q, k, v])
        else:
            out.update({f"{fusion_prefix}{ours}{n}_proj_weight": w for n, w in zip("qkv", (q, k, v))})
        out[f"{fusion_prefix}{ours}in_proj_bias"] = torch.cat(biases)
    for theirs, ours in FUSION_PARTS.items():
        for p in ("weight", "bias"):
            out[f"{fusion_prefix}{ours}.{p}"] = layer.pop(f"{theirs}.{p}")
    if layer:
        raise ConfigError(f"fusion layer weights with no place in the model: {', '.join(sorted(layer))}")
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor], model: CCRKModel) -> tuple[dict[str, torch.Tensor], bool]:
    """(the reference weights under ``model``'s names, whether they include the MLM head)."""
    rest = {k: v for k, v in state.items() if not IGNORED.search(k)}
    prefix = text_prefix(rest)
    first_fusion = model.config.text_layers
    out: dict[str, torch.Tensor] = {}

    vision = {k[len("vision_encoder."):]: rest.pop(k) for k in list(rest) if k.startswith("vision_encoder.")}
    out.update({f"vision.{k}": v for k, v in checkpoint_filter_fn(vision, model.vision).items()})

    fusion: dict[int, dict[str, torch.Tensor]] = {}
    for k in [k for k in rest if k.startswith(prefix)]:
        name = k[len(prefix):]
        m = LAYER.match(name)
        if m and int(m.group(1)) >= first_fusion:
            fusion.setdefault(int(m.group(1)) - first_fusion, {})[m.group(2)] = rest.pop(k)
        elif name.startswith(("embeddings.", "encoder.layer.")):
            out[f"text.{name}"] = rest.pop(k)
    for i, layer in sorted(fusion.items()):
        out.update(_layer_weights(layer, f"fusion.{i}."))

    for theirs, ours in HEADS.items():
        for k in [k for k in rest if k.startswith(theirs)]:
            out[ours + k[len(theirs):]] = rest.pop(k)
    out["temp"] = rest.pop("temp").reshape(())

    mlm = any(k.startswith("text_encoder.cls.") for k in rest)
    if mlm:
        for theirs, ours in MLM_PARTS.items():
            for k in [k for k in rest if k.startswith("text_encoder." + theirs)]:
                out[ours + k[len("text_encoder." + theirs):]] = rest.pop(k)
        decoder = rest.pop("text_encoder.cls.predictions.decoder.weight", None)
        rest.pop("text_encoder.cls.predictions.decoder.bias", None)     # the same tensor as .bias
        words = out["text.embeddings.word_embeddings.weight"]
        if decoder is not None and not torch.equal(decoder, words):
            raise ConfigError("the checkpoint's MLM decoder is not tied to the word embeddings: this model ties them")
    if rest:
        raise ConfigError(f"checkpoint weights with no place in the model: {', '.join(sorted(rest)[:8])}"
                          f"{' ...' if len(rest) > 8 else ''}")
    return out, mlm


def import_checkpoint(src: str | Path, out: str | Path, *, vision_config: str | Path | None = None,
                      text_config: str | None = None, tokenizer: str | Path | None = None,
                      trust_pickle: bool = False) -> Path:
    """Convert the reference checkpoint ``src`` into a saved model directory ``out`` (weights,
    tokenizer, preprocessing) that every ``ccrk`` command and ``ccrk_ray.load_model`` take."""
    state, train_config = read_checkpoint(src, trust_pickle)
    vision = vision_config_dict(vision_config)
    trained_at = train_config.get("image_res")
    if trained_at is not None and int(trained_at) != int(vision["image_res"]):
        raise ConfigError(f"{src} was trained at {trained_at} px but the vision config is for {vision['image_res']} "
                          f"px: pass --vision-config with the reference's Swin JSON of that resolution "
                          f"({train_config.get('vision_config', 'configs/config_swinB_384.json')})")
    config = model_config(state, vision, text_config_dict(text_config))
    caption_tokenizer = CaptionTokenizer(tokenizer or DEFAULT_TOKENIZER,
                                         int(train_config.get("max_tokens", DEFAULT_MAX_TOKENS)),
                                         int(train_config.get("max_words", DEFAULT_MAX_WORDS)))
    model = CCRKModel(config)
    weights, has_mlm = convert_state_dict(state, model)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:       # a shape differs: the configs do not describe this checkpoint
        raise ConfigError(f"{src}: the weights do not fit the architecture (pass --vision-config / --text-config "
                          f"for a model other than CCRK-3M's Swin-B + XLM-R-large): {first_line(exc)}") from None
    tied = "mlm_head.word_embeddings.weight"       # the word embeddings themselves
    missing = [k for k in missing if k != tied and not (k.startswith("mlm_head.") and not has_mlm)]
    if missing or unexpected:
        raise ConfigError(f"{src}: weights missing {missing[:6]}, unexpected {unexpected[:6]}")
    if not has_mlm:
        log.warning("%s is a fine-tuned checkpoint without the MLM head: mlm_logits of the imported model are "
                    "untrained", src)
    preprocess = Preprocess(image_size=int(vision["image_res"]),
                            max_length=caption_tokenizer.max_length, pre_caption=caption_tokenizer.pre_caption)
    return save_model_dir(out, model, caption_tokenizer, preprocess)
