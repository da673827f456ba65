"""``python -m kdops.demo --quick`` in-process: every track, the table, results.json and the plots;
``--tracks`` choosing a subset."""
import dataclasses
import json
import math
import re

import pytest
import torch

import kdops
from kdops.demo import attention_relation, encoder, main
from kdops.demo.classification import STUDENTS
from kdops.demo.encoder import QUICK_ENCODER
from kdops.demo.language_model import QUICK_LM, LMSetup, TinyLM
from kdops.demo.run import DEFAULT_TRACKS, TRACKS, parse_args

LM_STUDENTS = {
    "language-model": ["from scratch", "distilled"],
    "on-policy": ["supervised KD (data)", "GKD (on-policy)"],
    "sequence-level": ["CE on data", "CE on teacher corpus", "CE + KD on teacher corpus"],
    "quantized": ["KD, float", "KD, then PTQ int8", "QAT int8 + KD"],
    "preference": ["CE on data", "KD from the reference teacher", "KD from the tuned teacher"],
    "sampled-cache": ["dense KD", "top-8 cache", "sampled cache, k=10"],
    "attention-relation": ["distilled", "KD + attention relations"],
}


def test_demo_quick_all_tracks(tmp_path, capsys):
    results = main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--tracks", "all"])
    out = capsys.readouterr()
    assert "| track | model | params | held-out perplexity (accuracy) | recipe metric |" in out.out
    assert "student, KD + SP" in out.out and "student, GKD (on-policy)" in out.out
    assert "[####" in out.err  # progress bars go to stderr

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["quick"] is True and saved["machine"]["device"] == "cpu"
    assert list(saved["tracks"]) == list(TRACKS)
    # 3 classification lines, then per LM track: 1, 2, 2, 2, 3, 3, 3, then 5 of the encoder
    assert len(saved["verdicts"]) == 3 + 1 + 2 + 2 + 2 + 3 + 3 + 3 + 5
    assert all(("beat" in v) or ("level with" in v) or ("number tokens are" in v) or ("adding SP" in v)
               or ("gap to dense KD" in v) or ("training relation loss" in v)
               for v in saved["verdicts"])

    cls = saved["tracks"]["classification"]
    assert list(cls["students"]) == list(STUDENTS) and cls["seeds"] == [0]
    for student in cls["students"].values():
        assert 0.0 <= student["mean"] <= 1.0 and len(student["curve_mean"]) == cls["config"]["student_epochs"]

    setup = saved["language_model_setup"]
    assert setup["vocab_size"] == setup["config"]["vocab_size"]
    assert math.isfinite(setup["teacher"]["perplexity"]) and setup["teacher"]["perplexity"] > 1
    steps = setup["config"]["student_steps"]
    for track, students in LM_STUDENTS.items():
        r = saved["tracks"][track]
        assert list(r["students"]) == students and r["seeds"] == [0]
        for name, s in r["students"].items():
            ppl = s["perplexity"]
            assert len(ppl["values"]) == 1 and ppl["std"] == 0.0 and math.isfinite(ppl["mean"]) and ppl["mean"] > 1
            assert name == "KD, then PTQ int8" or s["curve"][-1][0] == steps
            if r["metric"]:
                assert len(s[r["metric"]["key"]]["values"]) == 1
    # the students every track calls the same are the same runs
    lm = saved["tracks"]["language-model"]["students"]
    tracks = saved["tracks"]
    assert tracks["on-policy"]["students"]["supervised KD (data)"]["perplexity"] == lm["distilled"]["perplexity"]
    assert tracks["sequence-level"]["students"]["CE on data"]["perplexity"] == lm["from scratch"]["perplexity"]
    assert tracks["attention-relation"]["students"]["distilled"]["perplexity"] == lm["distilled"]["perplexity"]
    cache = saved["tracks"]["sampled-cache"]
    assert cache["caches"]["top-8 cache"]["k"] == 8 and "coverage_mean" in cache["caches"]["top-8 cache"]
    sampled = cache["caches"]["sampled cache, k=10"]
    # equal bytes per token: the sampled cache's k is the one closest to the top-k cache's bytes
    assert abs(sampled["bytes_per_token"] - cache["caches"]["top-8 cache"]["bytes_per_token"]) < 5
    rates = saved["tracks"]["preference"]["students"]
    assert all(0.0 <= s["preference_rate"]["mean"] <= 1.0 for s in rates.values())
    enc = saved["tracks"]["encoder"]
    assert list(enc["students"]) == list(encoder.STUDENTS) and enc["seeds"] == [0]
    for s in enc["students"].values():
        assert 0.0 <= s["accuracy"]["mean"] <= 1.0 and s["perplexity"]["mean"] > 1 and s["relation"]["mean"] >= 0
        assert s["curve"][-1][0] == enc["setup"]["config"]["student_steps"]
    assert "| encoder | student, KD + attention relations + hints |" in out.out
    assert sum(v.startswith("encoder: ") for v in saved["verdicts"]) == 5

    for png in ("learning_curves.png", "recipe_results.png"):
        assert (tmp_path / png).exists() == ("wrote " + str(tmp_path / png) in out.out)


def test_demo_default_tracks(tmp_path, capsys):
    saved = main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    assert list(saved["tracks"]) == ["classification", "language-model"] and len(saved["verdicts"]) == 4
    assert "on-policy" not in capsys.readouterr().out


def test_demo_tracks_subset(tmp_path, capsys):
    saved = main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--tracks", "quantized", "--seeds", "3"])
    out = capsys.readouterr().out
    assert list(saved["tracks"]) == ["quantized"] and "classification" not in out
    assert saved["tracks"]["quantized"]["seeds"] == [3]
    assert len(saved["verdicts"]) == 2 and all(v.startswith("quantized: ") for v in saved["verdicts"])
    assert "LM student QAT" not in out  # progress bars are on stderr only


def test_demo_tracks_help_and_bad_names(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = re.sub(r"-\n\s*", "-", capsys.readouterr().out)  # argparse may wrap at a name's hyphen
    for track in TRACKS:
        assert track in text
    assert parse_args([]).tracks == list(DEFAULT_TRACKS) == ["classification", "language-model"]
    with pytest.raises(SystemExit):
        parse_args(["--tracks", "no-such-track"])
    assert "invalid choice" in capsys.readouterr().err


def test_attention_inputs_are_the_models_last_layer():
    """The track's q, k, v are the last layer's in_proj of its normalised input, and its hidden
    states those of the model's own forward (one and two layers, train and eval mode)."""
    for layers in (1, 2):
        model = TinyLM(50, 64, layers, 16)
        ids = torch.randint(50, (3, 16))
        for training in (True, False):
            model.train(training)
            with torch.no_grad():
                hidden, (q, k, v) = attention_relation.attention_inputs(model, ids)
                torch.testing.assert_close(hidden, model(ids), rtol=0, atol=0)
            last = model.layers.layers[-1]
            x = model.embed(ids) + model.position[:16]
            for layer in model.layers.layers[:-1]:  # the layers before the last, by hand
                x = layer(x, src_mask=torch.nn.Transformer.generate_square_subsequent_mask(16), is_causal=True)
            w_q, w_k, w_v = last.self_attn.in_proj_weight.chunk(3)
            b_q, b_k, b_v = last.self_attn.in_proj_bias.chunk(3)
            normed = last.norm1(x)
            for got, w, b in ((q, w_q, b_q), (k, w_k, b_k), (v, w_v, b_v)):
                torch.testing.assert_close(got, normed @ w.T + b)


def test_attention_relation_track_pulls_the_relations_toward_the_teacher(capsys):
    """Trained on the relation term, the student's held-out relation loss to the teacher falls
    below the untrained student's and below the KD-only student's, and the printed training
    relation loss goes down."""
    cfg = dataclasses.replace(QUICK_LM, student_steps=30, eval_every=30, attention_weight=20.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs (tiny matrices; a shared machine loses to more)
    try:
        setup = LMSetup(cfg, 0, torch.device("cpu"), "torch")
        r = attention_relation.run(setup, [0])
    finally:
        torch.set_num_threads(threads)
    students = r["students"]
    trained = students[attention_relation.STUDENT]["relation"]["mean"]  # 0.72 of the untrained's when written
    assert trained < 0.85 * r["reference"]["untrained student"]["relation"]
    assert trained < students["distilled"]["relation"]["mean"]
    trace = r["training_relation_loss"]["0"]
    assert trace["last"] < trace["first"]
    line = re.search(r"training relation loss ([0-9.]+) at step 1 -> ([0-9.]+) at step 30", capsys.readouterr().out)
    assert line and float(line[2]) < float(line[1])
    # the metric is kdops.attention_relation_loss on the last layers' q, k, v
    ids = setup.held_out[: 64 * cfg.context].view(-1, cfg.context)[:64]
    with torch.no_grad():
        (_, rel_s), (_, rel_t) = (attention_relation.attention_inputs(m, ids) for m in (setup.new_student(0),
                                                                                      setup.teacher))
    expected = sum(kdops.reference.attention_relation_loss(s, s, t, t, relation_heads=cfg.attention_relation_heads,
                                                           causal=True) for s, t in zip(rel_s, rel_t)) / 3
    assert r["reference"]["untrained student"]["relation"] == pytest.approx(expected.item(), rel=1e-5)


def test_encoder_padding_is_outside_the_attention():
    """The encoder track's batches: sequences of random lengths, [PAD] after them, [MASK] on the
    masked tokens only (at least one a sequence); whatever the padded positions hold, no
    token's hidden state or q, k, v changes (the attention sees the tokens' keys only)."""
    cfg = QUICK_ENCODER
    model = encoder.TinyEncoder(50, 32, 2, 8, cfg.context).eval()
    stream = torch.randint(50, (40 * cfg.context,))
    batch = encoder.make_batch(stream, torch.arange(0, 39 * cfg.context, cfg.context), cfg,
                               torch.Generator().manual_seed(0), model.pad, model.mask)
    tokens = batch.tokens
    assert (~tokens).any() and tokens[:, : cfg.min_length].all()
    assert batch.masked.any(1).all() and not (batch.masked & ~tokens).any()
    assert (batch.ids[~tokens] == model.pad).all() and (batch.ids[batch.masked] == model.mask).all()
    assert torch.equal(batch.targets, stream[torch.arange(0, 39 * cfg.context, cfg.context)[:, None]
                                             + torch.arange(cfg.context)][batch.masked])
    other = torch.where(tokens, batch.ids, torch.randint(50, batch.ids.shape))
    with torch.no_grad():
        (h, qkv), (h_other, qkv_other) = model(batch.ids, tokens), model(other, tokens)
    torch.testing.assert_close(h[tokens], h_other[tokens])
    for x, x_other in zip(qkv, qkv_other):
        torch.testing.assert_close(x[tokens], x_other[tokens])
    assert not torch.allclose(h[~tokens], h_other[~tokens])


def test_encoder_track_pulls_the_relations_toward_the_teacher():
    """Trained on the relation term, the encoder student's held-out relation loss to the teacher
    falls below the untrained student's and below the students trained without it; the metric
    is the reference's bidirectional relation loss with the padding mask."""
    cfg = dataclasses.replace(QUICK_ENCODER, student_steps=30, eval_every=30, attention_weight=20.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = encoder.run(cfg, [0], torch.device("cpu"), "torch")
        setup = encoder.EncoderSetup(cfg, torch.device("cpu"), "torch")  # the same teacher (deterministic)
    finally:
        torch.set_num_threads(threads)
    students = r["students"]
    trained = students["KD + attention relations"]["relation"]["mean"]
    assert trained < 0.85 * r["reference"]["untrained student"]["relation"]
    assert trained < min(students[name]["relation"]["mean"] for name in ("MLM from scratch", "KD"))
    b = setup.held_out
    assert (~b.tokens).any()  # the held-out sequences are padded
    with torch.no_grad():
        rel_s, rel_t = (m(b.ids, b.tokens)[1] for m in (setup.new_student(0), setup.teacher))
    expected = sum(kdops.reference.attention_relation_loss(s, s, t, t, relation_heads=cfg.relation_heads,
                                                           attention_mask=b.tokens) for s, t in zip(rel_s, rel_t)) / 3
    assert r["reference"]["untrained student"]["relation"] == pytest.approx(expected.item(), rel=1e-5)
