"""The digits recipe distils a trained CNN into a small MLP (--teacher), the
teacher labelling the batch and blends of it (--distill_mixup)."""

from __future__ import annotations

import json
import os

import pytest

from recipes import digits

pytestmark = pytest.mark.slow


def test_student_learns_from_a_teacher_checkpoint(tmp_path, digits_cnn_run):
    teacher = digits_cnn_run.out  # the recipe's default CNN, trained once for the suite
    student = str(tmp_path / "student")
    result = digits.main(["--model=mlp", "--hidden=32", "--epochs=15", f"--teacher={teacher}", "--distill_alpha=0.3",
                          "--distill_temperature=3", f"--out={student}", "--progress=false"])
    assert result["test_accuracy"] > 0.85
    rows = [json.loads(line) for line in open(os.path.join(student, "metrics.jsonl"))]
    distill = [r["distill"] for r in rows if r["split"] == "train"]
    assert distill and distill[-1] < distill[0]  # the student moves towards the teacher's distribution

    with pytest.raises(ValueError, match="trained on the split of seed 0; with --seed=1 it would have seen"):
        digits.main(["--model=mlp", "--seed=1", f"--teacher={teacher}", f"--out={tmp_path / 'x'}", "--progress=false"])
    with pytest.raises(ValueError, match="--distill_alpha <= 1"):
        digits.main(["--model=mlp", "--distill_alpha=2", f"--out={tmp_path / 'y'}", "--progress=false"])
    with pytest.raises(ValueError, match="--distill_mixup >= 0, got 0.5, 2.0, -1.0"):
        digits.main(["--model=mlp", "--distill_mixup=-1", f"--out={tmp_path / 'w'}", "--progress=false"])
    with pytest.raises(ValueError, match="--hidden sets the MLP's layer sizes"):
        digits.main(["--model=cnn", "--hidden=32", f"--out={tmp_path / 'z'}", "--progress=false"])
