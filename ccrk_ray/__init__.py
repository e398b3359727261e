"""ccrk-ray: cross-lingual cross-modal retrieval (CCRK, 1-to-K contrastive learning) on Ray."""

__version__ = "0.1.0"
