"""A toy two-stage model whose ITC and ITM scores are exact small numbers (ties on purpose).

Image i and caption i carry an integer id; ITC is the dot product of constant vectors (id_t · id_i ·
d, which favours large ids), ITM's "match" logit is −|id_t − id_i| (exact). Repeated ids plant ties
in both stages. Lives in a module of its own so Ray actors can unpickle it.
"""

import numpy as np
import torch

D = 4


class ToyTwoStage:
    has_fusion = True

    def eval(self):
        return self

    def image_tokens(self, px):
        return px.float().view(len(px), 1, -1)

    def image_feature(self, tokens):
        return tokens[:, 0]

    def text_hidden(self, ids, mask):
        return ids.float().unsqueeze(-1).expand(-1, -1, D)[:, :1]

    def text_feature(self, hidden):
        return hidden[:, 0]

    def fuse(self, hidden, mask, tokens):
        return torch.stack([hidden[:, 0, 0], tokens[:, 0, 0]], dim=1).unsqueeze(1)

    def itm_head(self, fused):
        h = fused[:, 0]
        return torch.stack([torch.zeros(len(h)), -(h[:, 0] - h[:, 1]).abs()], dim=1)


def toy_batch(image_ids: np.ndarray, caption_ids: np.ndarray) -> dict:
    """``image_ids`` (N,), ``caption_ids`` N×K: the ids the toy model turns into features."""
    n, k = caption_ids.shape
    pixels = np.repeat(image_ids.astype(np.float32)[:, None], D, axis=1).reshape(n, 1, 1, D)
    return {"pixel_values": pixels, "input_ids": caption_ids.astype(np.int64)[:, :, None],
            "attention_mask": np.ones((n, k, 1), dtype=np.int64)}
