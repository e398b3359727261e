"""``ccrk validate URI``: check a parquet file or prefix against the schema, row by row.

Schema problems name the file and column; row problems name the file, the row number in that
file, the image id and the field. Reads in record batches (constant memory) from any URI
``ccrk_ray.core.storage`` resolves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pyarrow.parquet as pq

from ccrk_ray.core import storage
from ccrk_ray.data import schema
from ccrk_ray.core.config import first_line
from ccrk_ray.core.log import bars_enabled, progress
from ccrk_ray.data.rows import SkipCounter, captions_problem, image_problem


@dataclass
class Problem:
    file: str
    row: int | None
    image_id: str | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row} (image_id {self.image_id!r})"
        return f"{where}: field {self.field!r}: {self.reason}"


@dataclass
class ValidationResult:
    files: int = 0
    rows: int = 0
    counts: SkipCounter = field(default_factory=SkipCounter)
    problems: list[Problem] = field(default_factory=list)     # the first ``max_problems``
    schema_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.schema_errors and self.counts.total == 0


def validate(uri: str, languages: Sequence[str] | None = None, min_languages: int = 1, max_problems: int = 20,
             endpoint_url: str | None = None, batch_rows: int = 256) -> ValidationResult:
    """Check every file under ``uri``. ``languages`` default: the caption columns of the first file."""
    fs, files = storage.list_parquet(uri, endpoint_url)
    result = ValidationResult(files=len(files))
    seen_ids: set[str] = set()

    def note(problem: Problem, reason_key: str) -> None:
        result.counts.add(reason_key, problem.image_id)
        if len(result.problems) < max_problems:
            result.problems.append(problem)

    for path in progress(files, desc="validating", unit="file", disable=not bars_enabled()):
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            langs = list(languages) if languages else schema.languages_in(pf.schema_arrow)
            schema.check_schema(pf.schema_arrow, langs, where=path)
        except schema.SchemaError as exc:
            result.schema_errors.append(str(exc))
            continue
        except (OSError, ValueError) as exc:      # pyarrow: not parquet, truncated, unreadable
            result.schema_errors.append(f"{path}: not a readable parquet file ({first_line(exc)})")
            continue
        columns = [schema.IMAGE_ID, schema.IMAGE] + [schema.caption_column(lang) for lang in langs]
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            data = batch.to_pydict()
            for i, image_id in enumerate(data[schema.IMAGE_ID]):
                result.rows += 1
                if image_id in seen_ids:
                    note(Problem(path, row, image_id, schema.IMAGE_ID, "duplicate_id"), "duplicate_id")
                seen_ids.add(image_id)
                reason = image_problem(data[schema.IMAGE][i])
                if reason:
                    note(Problem(path, row, image_id, schema.IMAGE, reason), reason)
                present = 0
                for lang in langs:
                    caps = data[schema.caption_column(lang)][i]
                    bad = captions_problem(caps)
                    if bad:
                        note(Problem(path, row, image_id, schema.caption_column(lang), bad), bad)
                    present += bool(caps)
                if present < min_languages:
                    note(Problem(path, row, image_id, "captions_*",
                                 f"missing_language ({present} of {min_languages} needed)"), "missing_language")
                row += 1
    return result


def report(result: ValidationResult) -> str:
    lines = [f"{result.files} files, {result.rows} rows checked"]
    lines += [f"schema: {e}" for e in result.schema_errors]
    lines += [str(p) for p in result.problems]
    if result.counts.total > len(result.problems):
        lines.append(f"... {result.counts.total - len(result.problems)} more row problems")
    lines.append("OK" if result.ok else f"problems: {result.counts.summary()}"
                 + (f"; {len(result.schema_errors)} files with schema errors" if result.schema_errors else ""))
    return "\n".join(lines)
