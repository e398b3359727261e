"""``ccrk evaluate``: a saved model on a parquet split (local or ``s3://``), per-language recall,
MRV and the rest of the report, as JSON and as a Markdown table.

By ITC similarity the embedding runs on Ray actors (``ccrk_ray.eval.actors``); two-stage
(``--k-test K``: the top K by ITC re-scored with the ITM head) runs in one process on the whole
split, which suits test sets of a few thousand images. Sharded ranking for 100k+ galleries is
issue 6's work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from ccrk_ray.config import ConfigError


def load_preprocess(model_dir: Path) -> dict[str, Any]:
    from ccrk_ray.demo import PREPROCESS_FILE

    path = model_dir / PREPROCESS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_evaluate(model_dir: str, data: str, out: str, *, languages: Sequence[str] | None = None,
                 k_test: int | None = None, image_size: int | None = None, max_length: int | None = None,
                 tokenizer: str | None = None) -> dict[str, Any]:
    from ccrk_ray.data import schema, storage
    from ccrk_ray.eval.report import build_report, format_table
    from ccrk_ray.languages import validate_languages
    from ccrk_ray.tokenizer import CaptionTokenizer

    t0 = time.perf_counter()
    model_path = Path(model_dir)
    if (model_path / "model").is_dir():             # a training checkpoint: its model/ subfolder
        model_path = model_path / "model"
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"--checkpoint {model_dir} is not a saved CCRK model or checkpoint")
    pre = load_preprocess(model_path)
    image_size = image_size or pre.get("image_size")
    max_length = max_length or pre.get("max_length")
    if not image_size or not max_length:
        raise ConfigError("--image-size and --max-length are needed: the model directory has no preprocess.json")
    try:
        fs, files = storage.list_parquet(data)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    import pyarrow.parquet as pq

    in_data = schema.languages_in(pq.ParquetFile(fs.open_input_file(files[0])).schema_arrow)
    langs = validate_languages(languages or pre.get("languages") or in_data)
    missing = [lang for lang in langs if lang not in in_data]
    if missing:
        raise ConfigError(f"{data} has no caption column for {', '.join(missing)} (it has {', '.join(in_data)})")
    caption_tokenizer = CaptionTokenizer(tokenizer or model_path, max_length)

    if k_test is None:
        import ray

        from ccrk_ray.demo import evaluate_split, init_ray

        started = init_ray(num_cpus=2)
        try:
            report = evaluate_split(data, str(model_path), langs, caption_tokenizer, image_size)
        finally:
            if started:
                ray.shutdown()
    else:
        from ccrk_ray.compare import load_test_batch
        from ccrk_ray.eval.retrieval import evaluate_in_process
        from ccrk_ray.model import CCRKModel

        if storage.is_remote(data):
            raise ConfigError("two-stage evaluation reads a local split; use --itc-only for s3:// data")
        batch = load_test_batch(Path(data), langs, caption_tokenizer, image_size)
        if k_test > len(batch["input_ids"]):
            raise ConfigError(f"--k-test {k_test} is larger than the gallery of {len(batch['input_ids'])} images")
        model = CCRKModel.from_pretrained(model_path)
        if not model.has_fusion:
            raise ConfigError(f"--k-test needs a model with fusion layers (ITM head); {model_path} is a dual "
                              "encoder: leave --k-test out")
        report = build_report(*evaluate_in_process(model, batch, k_test=k_test), langs)
    report.update(model=str(model_path), data=data, k_test=k_test, seconds=round(time.perf_counter() - t0, 1))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    table = format_table(report)
    (out_dir / "report.md").write_text("```\n" + table + "\n```\n")
    print(table, flush=True)
    return report
