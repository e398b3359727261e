"""ccrk-ray: cross-lingual cross-modal retrieval (CCRK, 1-to-K contrastive learning) on Ray.

``ccrk_ray.load_model(DIR)``: a saved model (a model directory, a training checkpoint, an imported
reference checkpoint) with ``encode_image``, ``encode_text``, ``match_logits`` and ``mlm_logits``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch and the model load on first use: ``import ccrk_ray`` (and ``ccrk --help``) stays light
    if name == "load_model":
        from ccrk_ray.model.saved import load_model

        return load_model
    raise AttributeError(f"module 'ccrk_ray' has no attribute {name!r}")
