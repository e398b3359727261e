"""Tiny checkpoints in the CCRK reference code's layout (key names and shapes of its XVLM modules:
Microsoft's Swin, an XLM-R text encoder whose upper layers have ``crossattention``, X-VLM heads),
and an independent forward of the text side written from the paper's design, to check what an
imported model computes.

The real reference code is compared in ``benchmarks/reference_equality.py``; the suite has no copy
of it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import timm
import torch
import torch.nn.functional as F

HIDDEN, HEADS, INTERMEDIATE, VOCAB, POSITIONS = 32, 4, 64, 100, 40
LAYERS, FIRST_FUSION, EMBED = 4, 2, 16
TEXT_CONFIG = {"model_type": "xlm-roberta", "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
               "intermediate_size": INTERMEDIATE, "max_position_embeddings": POSITIONS, "type_vocab_size": 1,
               "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
               "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
# A Swin of 64 px whose last stage is 128 wide (the image tokens' width, unlike the text's 32)
SWIN = {"vision_width": 128, "image_res": 64, "window_size": 2, "embed_dim": 16, "depths": [2, 2, 2, 2],
        "num_heads": [2, 2, 4, 8]}
VISION_WIDTH = SWIN["vision_width"]


def swin_reference_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random Swin weights named as Microsoft's Swin names them (patch merging at a stage's end)."""
    timm_swin = timm.create_model("swin_base_patch4_window7_224", num_classes=0, img_size=SWIN["image_res"],
                                  window_size=SWIN["window_size"], embed_dim=SWIN["embed_dim"],
                                  depths=SWIN["depths"], num_heads=SWIN["num_heads"])
    out = {}
    for k, v in timm_swin.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        if k.endswith("relative_position_index"):
            out["vision_encoder." + k] = v.clone()         # a buffer the reference saves too
            continue
        noise = torch.randn(v.shape, generator=gen)
        is_norm_weight = re.search(r"norm\d?\.weight$", k) is not None
        out["vision_encoder." + k] = 1 + 0.1 * noise if is_norm_weight else 0.2 * noise
    return out


def _linear(gen, out_dim, in_dim, name) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim),
            f"{name}.bias": torch.randn(out_dim, generator=gen) * 0.1}


def _norm(gen, dim, name) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": 1 + torch.randn(dim, generator=gen) * 0.1,
            f"{name}.bias": torch.randn(dim, generator=gen) * 0.1}


def reference_state(pretrain: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny CCRK state dict: pre-training's (``text_encoder.bert.`` + MLM head) or fine-tuning's."""
    gen = torch.Generator().manual_seed(seed)
    t = "text_encoder.bert." if pretrain else "text_encoder."
    s = swin_reference_weights(gen)
    s[t + "embeddings.word_embeddings.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen)
    s[t + "embeddings.position_embeddings.weight"] = torch.randn(POSITIONS, HIDDEN, generator=gen)
    s[t + "embeddings.token_type_embeddings.weight"] = torch.randn(1, HIDDEN, generator=gen)
    s[t + "embeddings.position_ids"] = torch.arange(POSITIONS).expand(1, -1)
    s.update(_norm(gen, HIDDEN, t + "embeddings.LayerNorm"))
    for i in range(LAYERS):
        p = f"{t}encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i >= FIRST_FUSION else [])
        for block in blocks:
            width = VISION_WIDTH if block == "crossattention" else HIDDEN
            s.update(_linear(gen, HIDDEN, HIDDEN, f"{p}{block}.self.query"))
            s.update(_linear(gen, HIDDEN, width, f"{p}{block}.self.key"))
            s.update(_linear(gen, HIDDEN, width, f"{p}{block}.self.value"))
            s.update(_linear(gen, HIDDEN, HIDDEN, f"{p}{block}.output.dense"))
            s.update(_norm(gen, HIDDEN, f"{p}{block}.output.LayerNorm"))
        s.update(_linear(gen, INTERMEDIATE, HIDDEN, f"{p}intermediate.dense"))
        s.update(_linear(gen, HIDDEN, INTERMEDIATE, f"{p}output.dense"))
        s.update(_norm(gen, HIDDEN, f"{p}output.LayerNorm"))
    s.update(_linear(gen, EMBED, VISION_WIDTH, "vision_proj"))
    s.update(_linear(gen, EMBED, HIDDEN, "text_proj"))
    s["temp"] = torch.tensor(0.07)
    s.update(_linear(gen, 2 * HIDDEN, HIDDEN, "itm_head.0"))
    s.update(_norm(gen, 2 * HIDDEN, "itm_head.1"))
    s.update(_linear(gen, 2, 2 * HIDDEN, "itm_head.3"))
    if pretrain:
        s.update(_linear(gen, HIDDEN, HIDDEN, "text_encoder.cls.predictions.transform.dense"))
        s.update(_norm(gen, HIDDEN, "text_encoder.cls.predictions.transform.LayerNorm"))
        s["text_encoder.cls.predictions.bias"] = torch.randn(VOCAB, generator=gen) * 0.1
        s["text_encoder.cls.predictions.decoder.weight"] = s[t + "embeddings.word_embeddings.weight"]
        s["text_encoder.cls.predictions.decoder.bias"] = s["text_encoder.cls.predictions.bias"]
    return s


def full_wrapping(state: dict[str, torch.Tensor]) -> dict:
    """``Pretrain.py``'s checkpoint: the model beside training state, numpy's RNG state included."""
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
            "config": {"image_res": SWIN["image_res"], "max_tokens": 30, "max_words": 30}, "epoch": 29,
            "np_random_state": np.random.RandomState(0).get_state(), "torch_rng_state": torch.get_rng_state(),
            "global_step": 100}


# --- an independent forward of the text side (BERT post-LayerNorm layers, X-VLM heads) -------------

def _attention(s, p, x, kv, key_mask):
    b, lq, _ = x.shape
    heads = lambda t: t.view(b, t.shape[1], HEADS, HIDDEN // HEADS).transpose(1, 2)     # noqa: E731
    q = heads(F.linear(x, s[p + "self.query.weight"], s[p + "self.query.bias"]))
    k = heads(F.linear(kv, s[p + "self.key.weight"], s[p + "self.key.bias"]))
    v = heads(F.linear(kv, s[p + "self.value.weight"], s[p + "self.value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + (1.0 - key_mask[:, None, None, :].float()) * -10000.0
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, HIDDEN)
    out = F.linear(ctx, s[p + "output.dense.weight"], s[p + "output.dense.bias"])
    return F.layer_norm(out + x, (HIDDEN,), s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"], 1e-5)


def _layer(s, p, x, mask, image=None):
    x = _attention(s, p + "attention.", x, x, mask)
    if image is not None:
        x = _attention(s, p + "crossattention.", x, image, torch.ones(image.shape[:2]))
    h = F.gelu(F.linear(x, s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"]))
    h = F.linear(h, s[p + "output.dense.weight"], s[p + "output.dense.bias"])
    return F.layer_norm(h + x, (HIDDEN,), s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"], 1e-5)


def reference_text(s, ids, mask, image=None):
    """The text encoder's output: text layers only (``image`` None), or all layers over ``image``."""
    t = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in s else "text_encoder."
    x = (s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.token_type_embeddings.weight"][0]
         + s[t + "embeddings.position_embeddings.weight"][torch.arange(ids.shape[1])])
    x = F.layer_norm(x, (HIDDEN,), s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"], 1e-5)
    for i in range(LAYERS if image is not None else FIRST_FUSION):
        x = _layer(s, f"{t}encoder.layer.{i}.", x, mask, image if i >= FIRST_FUSION else None)
    return x


def reference_outputs(s, image_tokens, ids, mask):
    """(text ITC features, ITM logits, MLM logits) of caption i with image i."""
    text_feat = F.normalize(F.linear(reference_text(s, ids, mask)[:, 0], s["text_proj.weight"], s["text_proj.bias"]),
                            dim=-1)
    fused = reference_text(s, ids, mask, image_tokens)
    h = F.linear(fused[:, 0], s["itm_head.0.weight"], s["itm_head.0.bias"])
    h = F.gelu(F.layer_norm(h, (2 * HIDDEN,), s["itm_head.1.weight"], s["itm_head.1.bias"], 1e-5))
    itm = F.linear(h, s["itm_head.3.weight"], s["itm_head.3.bias"])
    mlm = None
    if "text_encoder.cls.predictions.bias" in s:
        c = "text_encoder.cls.predictions."
        h = F.gelu(F.linear(fused, s[c + "transform.dense.weight"], s[c + "transform.dense.bias"]))
        h = F.layer_norm(h, (HIDDEN,), s[c + "transform.LayerNorm.weight"], s[c + "transform.LayerNorm.bias"], 1e-5)
        mlm = F.linear(h, s[c + "decoder.weight"], s[c + "bias"])
    return text_feat, itm, mlm
