"""``python -m kdops.demo --quick`` in-process: the table, results.json and the plot."""
import json
import math

from kdops.demo import main
from kdops.demo.classification import STUDENTS


def test_demo_quick(tmp_path, capsys):
    results = main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr()
    assert "| track | model | params | held-out metric |" in out.out
    assert "student, KD + SP" in out.out and "student, distilled" in out.out
    assert "[####" in out.err  # progress bars go to stderr

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["quick"] is True and saved["machine"]["device"] == "cpu"
    assert len(saved["verdicts"]) == 4

    cls = saved["classification"]
    assert list(cls["students"]) == list(STUDENTS) and cls["seeds"] == [0]
    for student in cls["students"].values():
        assert 0.0 <= student["mean"] <= 1.0 and len(student["curve_mean"]) == cls["config"]["student_epochs"]
    assert set(cls["distillation_beats_baseline"]) == {"KD", "KD + SP"}

    lm = saved["language_modelling"]
    assert lm["vocab_size"] == lm["config"]["vocab_size"]
    for model in (lm["teacher"], *lm["students"].values()):
        assert math.isfinite(model["perplexity"]) and model["perplexity"] > 1
        assert model["curve"][-1][0] == lm["config"]["student_steps"] or model is lm["teacher"]
    assert isinstance(lm["distillation_beats_baseline"], bool)

    png = tmp_path / "learning_curves.png"
    assert png.exists() == ("wrote " + str(png) in out.out)
