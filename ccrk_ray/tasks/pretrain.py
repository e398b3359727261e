"""``ccrk pretrain``'s run: 1-to-K pre-training on Ray Train from a ``PretrainConfig``
(``ccrk_ray.train.config``), then the final model on the config's test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccrk_ray.core.config import ConfigError
from ccrk_ray.core.runtime import ray_session
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.eval.evaluate import evaluate_test_sets, run_cpus
from ccrk_ray.train.config import PretrainConfig
from ccrk_ray.train.trainer import check_training_data, prepare_run, run_training


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    prepare_run(cfg, resume)
    source = cfg.data.tokenizer or cfg.model.get("text_name_or_path")
    if not source:
        raise ConfigError("data.tokenizer: a tokenizer name or path is needed when the text model is built from "
                          "a config")
    tokenizer = load_tokenizer(source)
    caption_tokenizer = CaptionTokenizer(tokenizer, cfg.data.max_length, cfg.data.pre_caption)
    check = check_training_data(cfg)
    with ray_session(run_cpus(cfg.cpus_held())):
        metrics = run_training(cfg, tokenizer, caption_tokenizer, resume=resume, check=check)
        if cfg.data.test or cfg.data.translate_test:
            out = Path(cfg.output_dir).resolve()
            metrics["test"] = {
                **evaluate_test_sets(cfg.data.test, out / "model", out / "test", cfg.data.languages, None,
                                     dataset=cfg.name),
                **evaluate_test_sets(cfg.data.translate_test, out / "model", out / "test", cfg.data.languages, None,
                                     dataset=cfg.name, name="translate_test")}
    return metrics
