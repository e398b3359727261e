import pytest
import torch
import torch.nn.functional as F

from ccrk_ray.objectives.losses import mask_tokens, one_to_k_contrastive, sample_mitm
from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.objectives.styles import ObjectiveModule, build_objective
from tests.conftest import tiny_text_config

LANGS = ["zh", "en", "de"]
VOCAB = 60
SPECIALS = [0, 1, 2, 3, 59]
OBJ_ARGS = dict(mask_token_id=59, vocab_size=VOCAB, special_ids=SPECIALS, languages=LANGS)


def fusion_model(seed=0) -> CCRKModel:
    torch.manual_seed(seed)
    cfg = dict(tiny_text_config(VOCAB), num_hidden_layers=2)
    # zero_init_last=False: timm zero-initialises each residual block's last BN, which would leave the
    # block's other weights without gradient at step 0 and hide what this test checks.
    return CCRKModel(ModelConfig(vision_name="resnet10t", vision_kwargs={"zero_init_last": False},
                                 text_pretrained=False, text_config=cfg, text_layers=1, fusion_layers=1,
                                 embed_dim=16))


def make_batch(n=4, k=3, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB - 1, (n, k, length), generator=g)
    ids[..., 0] = 0
    lengths = torch.randint(3, length + 1, (n, k), generator=g)
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).long()
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
    ids[torch.arange(n)[:, None], torch.arange(k)[None], lengths - 1] = 2
    return {"pixel_values": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask}


def reference_one_to_k(model, batch, seed):
    """Straightforward recomputation: per-pair fusion calls, hand-written cross-entropies."""
    n, k, length = batch["input_ids"].shape
    longest = int(batch["attention_mask"].sum(-1).max())
    ids = batch["input_ids"][..., :longest].reshape(n * k, longest)
    mask = batch["attention_mask"][..., :longest].reshape(n * k, longest)
    tokens = model.image_tokens(batch["pixel_values"])
    img = model.image_feature(tokens)
    hidden = model.text_hidden(ids, mask)
    txt = model.text_feature(hidden)
    temp = model.temperature
    logits = img @ txt.t() / temp
    own = torch.zeros(n, n * k)
    for i in range(n):
        own[i, i * k:(i + 1) * k] = 1
    itc = (-(own * logits.log_softmax(1)).sum(1).mean() + -(own.t() * logits.t().log_softmax(1)).sum(1).mean()) / 2 / k
    torch.manual_seed(seed)
    s = sample_mitm((img @ txt.t() / temp).detach(), k)
    ce = []
    for i in range(n):
        for t_row, image_row, label in ((s.pos_text[i], i, 1), (s.pos_text[i], s.neg_image[i], 0),
                                         (s.neg_text[i], i, 0)):
            fused = model.fuse(hidden[t_row:t_row + 1], mask[t_row:t_row + 1], tokens[image_row:image_row + 1])
            ce.append(-model.itm_head(fused).log_softmax(-1)[0, label])
    itm = torch.stack(ce).mean()
    masked, labels = mask_tokens(ids[s.pos_text], mask[s.pos_text], mask_token_id=59, vocab_size=VOCAB,
                                 special_ids=SPECIALS, mask_prob=0.4, max_masks=10)
    logits_mlm = model.mlm_head(model.fuse(model.text_hidden(masked, mask[s.pos_text]), mask[s.pos_text], tokens))
    sel = labels != -100
    mlm = -logits_mlm[sel].log_softmax(-1).gather(1, labels[sel][:, None]).mean()
    return itc, itm, mlm


def test_one_to_k_equals_straightforward_computation():
    model = fusion_model().eval()          # eval: no dropout, so both passes see the same network
    batch = make_batch()
    torch.manual_seed(5)
    out = build_objective("one_to_k", **OBJ_ARGS)(model, batch)
    itc, itm, mlm = reference_one_to_k(model, batch, seed=5)
    torch.testing.assert_close(out["itc"], itc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["itm"], itm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["mlm"], mlm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"], itc + itm + mlm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["one_to_k", "one_to_one", "cross_lingual"])
def test_gradients_reach_every_parameter(name):
    model = fusion_model()
    module = ObjectiveModule(model, build_objective(name, **OBJ_ARGS))
    torch.manual_seed(0)
    out = module(make_batch())
    assert {"loss", "itc", "itm", "mlm", "vicreg_invariance"} <= set(out)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_one_to_one_is_clip_on_one_caption_per_image():
    model = fusion_model().eval()
    batch = make_batch()
    torch.manual_seed(3)
    out = build_objective("one_to_one", itm_weight=0, mlm_weight=0)(model, batch)
    torch.manual_seed(3)
    n, k, _ = batch["input_ids"].shape
    pick = torch.randint(0, k, (n,))
    longest = int(batch["attention_mask"].sum(-1).max())
    ids = batch["input_ids"][torch.arange(n), pick, :longest]
    mask = batch["attention_mask"][torch.arange(n), pick, :longest]
    img, txt = model.encode_image(batch["pixel_values"]), model.encode_text(ids, mask)
    logits = img @ txt.t() / model.temperature
    clip = (F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(logits.t(), torch.arange(n))) / 2
    torch.testing.assert_close(out["loss"], clip, rtol=1e-5, atol=1e-6)
    assert "itm" not in out and "mlm" not in out


def test_cross_lingual_reaches_the_image_only_through_english():
    model = fusion_model().eval()
    batch = make_batch()
    out = build_objective("cross_lingual", itm_weight=0, mlm_weight=0, languages=LANGS)(model, batch)
    n, k, _ = batch["input_ids"].shape
    longest = int(batch["attention_mask"].sum(-1).max())
    ids = batch["input_ids"][..., :longest].reshape(n * k, -1)
    mask = batch["attention_mask"][..., :longest].reshape(n * k, -1)
    img, txt = model.encode_image(batch["pixel_values"]), model.encode_text(ids, mask).view(n, k, -1)
    temp = model.temperature
    en = txt[:, 1]
    image_en = one_to_k_contrastive(img, en, temp)
    text_text = (one_to_k_contrastive(en, txt[:, 0], temp) + one_to_k_contrastive(en, txt[:, 2], temp)) / 2
    torch.testing.assert_close(out["loss"], image_en + text_text, rtol=1e-5, atol=1e-6)
    # the loss has no image–zh or image–de term: changing only the zh captions' tokens leaves the
    # image–English part unchanged
    assert out["itc_image_en"].item() == pytest.approx(image_en.item(), rel=1e-5)


def test_vicreg_terms_are_logged_and_added_only_with_weight():
    model = fusion_model().eval()
    batch = make_batch()
    args = dict(itm_weight=0, mlm_weight=0)
    plain = build_objective("one_to_k", **args)(model, batch)
    weighted = build_objective("one_to_k", vicreg_weights={"variance": 2.0}, **args)(model, batch)
    assert not plain["vicreg_variance"].requires_grad
    torch.testing.assert_close(weighted["loss"], plain["loss"] + 2.0 * plain["vicreg_variance"])


def test_bad_objective_configs():
    with pytest.raises(ValueError, match="unknown objective 'two_to_k'"):
        build_objective("two_to_k")
    with pytest.raises(ValueError, match="needs English"):
        build_objective("cross_lingual", itm_weight=0, mlm_weight=0, languages=["zh", "de"])
    with pytest.raises(ValueError, match="mask_token_id"):
        build_objective("one_to_k")
    with pytest.raises(ValueError, match="unknown VICReg term"):
        build_objective("one_to_k", itm_weight=0, mlm_weight=0, vicreg_weights={"whitening": 1.0})
    dual = CCRKModel(ModelConfig(text_pretrained=False, text_config=tiny_text_config(VOCAB), embed_dim=8))
    with pytest.raises(ValueError, match="needs a model with fusion_layers > 0"):
        ObjectiveModule(dual, build_objective("one_to_k", **OBJ_ARGS))
    with pytest.raises(ValueError, match="not a whole multiple"):
        build_objective("one_to_k", itm_weight=0, mlm_weight=0)(dual, {**make_batch(n=4, k=2), "pixel_values":
                                                                      make_batch(n=3)["pixel_values"]})


def test_unused_parts_are_named_by_weight():
    """What DDP must skip: parts of the model a zero-weight term never computes."""
    def names(itm, mlm):
        module = ObjectiveModule(fusion_model(), build_objective("one_to_k", itm_weight=itm, mlm_weight=mlm, **OBJ_ARGS))
        return {n.split(".")[1] for n in module.unused_parameter_names()}

    assert names(1.0, 1.0) == set()
    assert names(1.0, 0.0) == {"mlm_head"}
    assert names(0.0, 1.0) == {"itm_head"}
    assert names(0.0, 0.0) == {"fusion", "itm_head", "mlm_head", "vision_to_text"}
