"""``ccrk nrccr demo`` end to end as a user runs it (small size): synthetic noisy translations in
NRCCR's layout, converted, two objectives trained on the command's own Ray cluster, a SumR table."""

from __future__ import annotations

import json

import pytest

from tests.commands import ccrk, noise
from tests.conftest import RAY

pytestmark = RAY


def test_the_demo_trains_each_objective_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    res = ccrk("nrccr", "demo", "--out", out, "--noise", "0.5", "--variants", "triplet,full", "--train-items", 64,
               "--val-items", 16, "--test-items", 16, "--epochs", 2, timeout=900)
    assert noise(res) == [], "\n".join(noise(res))
    table = (out / "demo_table.md").read_text()
    assert res.stdout.endswith(table + "\n")
    assert table.splitlines()[0] == "| objective | SumR p=0.5 (t2i R@1/5/10) |"
    result = json.loads((out / "demo_table.json").read_text())
    assert [(r["variant"], r["noise"]) for r in result["rows"]] == [("triplet", 0.5), ("full", 0.5)]
    for row in result["rows"]:
        report = json.loads((out / "runs" / "p0.5" / row["variant"] / "test" / "report.json").read_text())
        assert report["languages"]["de"]["SumR"] == pytest.approx(row["SumR"])
        assert 0 < row["SumR"] <= 600 and report["languages"]["de"]["t2i"]["num_queries"] == 32
        train = json.loads((out / "runs" / "p0.5" / row["variant"] / "train_result.json").read_text())
        terms = {k for k in train["metrics"] if k.startswith("loss/")}
        # the baseline trains the two triplets only (no discriminator); full NRCCR every term
        assert terms == ({"loss/triplet", "loss/triplet_translation"} if row["variant"] == "triplet"
                         else {f"loss/{t}" for t in ("triplet", "triplet_translation", "similarity_distillation",
                                                     "feature_distillation", "back_translation", "adversarial",
                                                     "discriminator")})
    # about half the translations carry an injected error, which their back-translations repeat (a
    # clean one back-translates to its source exactly); the test captions are people's: clean
    raw = out / "data" / "p0.5" / "raw" / "TextData"
    text = lambda name: [line.split(" ", 1)[1] for line in (raw / name).read_text().splitlines()]  # noqa: E731
    wrong = sum(a != b for a, b in zip(text("train_enc.txt"), text("train_enc2de2enc.txt"))) / 128
    assert 0.3 < wrong < 0.7
    assert len(text("test_de.txt")) == 32
