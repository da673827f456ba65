"""The LLM-recipe tracks of the demo (:mod:`kdops.recipes`), on the language-modelling setup of
:mod:`kdops.demo.language_model` (same corpus, teacher, student architecture and step count; the
baselines are the track's ``from scratch`` and ``distilled`` students of the same seeds):

* ``on-policy``: GKD (half the batches on the student's own samples, reverse KL) vs supervised
  KD on the data; metric: the teacher's NLL per token of the student's generations.
* ``sequence-level``: CE on a corpus the teacher generated once (T = 1), and CE + token-level KD
  on it, vs CE on the data alone.
* ``quantized``: QAT (int8 weights, 8-bit linear inputs, through torch.ao) with the KD loss vs
  post-training quantisation of the distilled float student; both int8 models evaluated.
* ``preference``: the teacher tilted toward number tokens (``p* ∝ p_ref exp(r / beta)``); the
  rate of number tokens in the generations of a student distilled from it vs trained on data.

Each returns ``{"seeds", "students": {name: {metric: {values, mean, std}, "curve"}}, "metric",
"reference", ...}``: the table, the verdicts and the plots read these.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import torch

from kdops import recipes
from kdops.demo.common import generator
from kdops.demo.language_model import LMSetup, parameters, perplexity, summarize, train

NUMBER = re.compile(r"[0-9]+")


def on_policy(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg

    def gkd(seed: int):
        g = generator(20_000 + seed, setup.device)
        return lambda student: lambda seq: recipes.on_policy.gkd_loss(
            student, setup.teacher, seq, cfg.prompt_len, on_policy_fraction=cfg.on_policy_fraction,
            divergence=cfg.on_policy_divergence, temperature=cfg.temperature, generator=g, backend=setup.backend)

    def judged(model, seed: int) -> float:
        with torch.no_grad():
            return recipes.generation.continuation_nll(setup.teacher, setup.generations(model, seed),
                                                       cfg.prompt_len).item()

    per_seed: dict[str, list[dict]] = {"supervised KD (data)": [], "GKD (on-policy)": []}
    for seed in seeds:
        kd, kd_curve = setup.baseline("distilled", seed)
        student, curve = setup.train_student(seed, gkd(seed), "LM student GKD")
        for name, model, c in (("supervised KD (data)", kd, kd_curve), ("GKD (on-policy)", student, curve)):
            per_seed[name].append({"perplexity": c[-1][1], "teacher_nll": judged(model, seed), "curve": c})
    return {"seeds": seeds, "students": summarize(per_seed),
            "metric": {"key": "teacher_nll", "name": "teacher NLL/token of its generations", "lower_is_better": True},
            "reference": {"teacher": {"teacher_nll": judged(setup.teacher, 0)}},
            "settings": {"on_policy_fraction": cfg.on_policy_fraction, "divergence": cfg.on_policy_divergence}}


def sequence_level(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    g = generator(30_000)
    starts = torch.randint(setup.student_stream.numel() - cfg.prompt_len, (cfg.corpus_sequences, 1), generator=g)
    prompts = setup.student_stream[starts + torch.arange(cfg.prompt_len)].to(setup.device)
    corpus = recipes.sequence_level.generate_corpus(setup.teacher, prompts, cfg.context + 1 - cfg.prompt_len,
                                                    temperature=1.0, generator=generator(30_001, setup.device))
    rows = lambda g: corpus[torch.randint(corpus.shape[0], (cfg.batch_size,), generator=g).to(corpus.device)]

    def loss(teacher):
        return lambda student: lambda seq: recipes.sequence_level.sequence_level_loss(
            student, seq, cfg.prompt_len, teacher=teacher, hard_weight=cfg.sequence_hard_weight,
            temperature=cfg.temperature, backend=setup.backend)

    per_seed: dict[str, list[dict]] = {"CE on data": [], "CE on teacher corpus": [], "CE + KD on teacher corpus": []}
    for seed in seeds:
        _, scratch = setup.baseline("from scratch", seed)
        per_seed["CE on data"].append({"perplexity": scratch[-1][1], "curve": scratch})
        for name, teacher in (("CE on teacher corpus", None), ("CE + KD on teacher corpus", setup.teacher)):
            _, curve = setup.train_student(seed, loss(teacher), f"LM student {name}", batches=rows)
            per_seed[name].append({"perplexity": curve[-1][1], "curve": curve})
    return {"seeds": seeds, "students": summarize(per_seed), "metric": None,
            "corpus": {"sequences": corpus.shape[0], "prompt_len": cfg.prompt_len,
                       "generated_tokens": corpus.shape[0] * (corpus.shape[1] - cfg.prompt_len)}}


def quantized(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    activations = cfg.quantize_activations

    def calibrate(model) -> None:
        data = setup.data(setup.student_stream)
        g = generator(40_000)
        for _ in range(8):
            model(data(g)[:, :-1].to(setup.device))

    def qat(student):
        return setup.distill(recipes.quantized.prepare(student, activations=activations))

    per_seed: dict[str, list[dict]] = {"KD, float": [], "KD, then PTQ int8": [], "QAT int8 + KD": []}
    for seed in seeds:
        kd, kd_curve = setup.baseline("distilled", seed)
        ptq = recipes.quantized.quantize_post_training(copy.deepcopy(kd), calibrate, activations=activations)
        student, curve = setup.train_student(seed, qat, "LM student QAT + KD")
        recipes.quantized.freeze(student)
        per_seed["KD, float"].append({"perplexity": kd_curve[-1][1], "curve": kd_curve})
        per_seed["KD, then PTQ int8"].append({"perplexity": perplexity(ptq, setup.held_out, cfg.context, setup.device),
                                              "curve": []})
        per_seed["QAT int8 + KD"].append({"perplexity": perplexity(student, setup.held_out, cfg.context, setup.device),
                                          "curve": curve})
    return {"seeds": seeds, "students": summarize(per_seed), "metric": None,
            "settings": {"weights": "int8 per output channel, symmetric",
                         "activations": "uint8 per tensor, affine (inputs of the nn.Linear layers)" if activations
                         else "float"}}


def preference(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    preferred = torch.tensor([bool(NUMBER.fullmatch(t)) for t in setup.tokenizer.vocab], device=setup.device)
    reward = preferred.float()
    tuned = copy.deepcopy(setup.teacher).train().requires_grad_(True)
    train(tuned, cfg.preference_steps, dataclasses.replace(cfg, eval_every=cfg.preference_steps), 50_000, setup.data(setup.stream),
          lambda seq: recipes.preference.preference_tuning_loss(tuned, setup.teacher, seq[:, :-1], reward,
                                                                beta=cfg.preference_beta, backend=setup.backend),
          setup.held_out, setup.device, "LM teacher preference tuning")
    tuned.eval().requires_grad_(False)

    def rate(model, seed: int) -> float:
        return recipes.preference.preference_rate(setup.generations(model, seed), cfg.prompt_len, preferred)

    per_seed: dict[str, list[dict]] = {"CE on data": [], "KD from the reference teacher": [],
                                       "KD from the tuned teacher": []}
    for seed in seeds:
        for name, base in (("CE on data", "from scratch"), ("KD from the reference teacher", "distilled")):
            model, curve = setup.baseline(base, seed)
            per_seed[name].append({"perplexity": curve[-1][1], "preference_rate": rate(model, seed), "curve": curve})
        student, curve = setup.train_student(seed, lambda s: setup.distill(s, tuned), "LM student KD from tuned")
        per_seed["KD from the tuned teacher"].append({"perplexity": curve[-1][1], "preference_rate": rate(student, seed),
                                                     "curve": curve})
    data_rate = preferred.cpu()[setup.held_out].float().mean().item()
    return {"seeds": seeds, "students": summarize(per_seed),
            "metric": {"key": "preference_rate", "name": "share of number tokens in its generations",
                       "lower_is_better": False},
            "reference": {"held-out data": {"preference_rate": data_rate},
                          "reference teacher": {"preference_rate": rate(setup.teacher, 0),
                                                "perplexity": setup.teacher_result["perplexity"]},
                          "tuned teacher": {"preference_rate": rate(tuned, 0),
                                            "perplexity": perplexity(tuned, setup.held_out, cfg.context, setup.device)}},
            "settings": {"preferred": "number tokens ([0-9]+)", "preferred_tokens": int(preferred.sum()),
                         "beta": cfg.preference_beta, "tuning_steps": cfg.preference_steps,
                         "parameters": parameters(tuned)}}
