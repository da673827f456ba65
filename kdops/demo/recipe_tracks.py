"""The LLM-recipe tracks of the demo (:mod:`kdops.recipes`), on the language-modelling setup of
:mod:`kdops.demo.language_model` (same corpus, teacher, student architecture and step count; the
baselines are the track's ``from scratch`` and ``distilled`` students of the same seeds):

* ``on-policy``: supervised KD on the data for the first half of the steps, then GKD (half the
  batches on the student's own samples, reverse KL), vs supervised KD throughout; metric: the
  teacher's NLL per token of the student's generations of held-out prompts.
* ``sequence-level``: CE on a corpus the teacher generated once (T = 1), and CE + token-level KD
  on it, vs CE on the data alone.
* ``quantized``: QAT (int8 weights, 8-bit linear inputs, through torch.ao) with the KD loss vs
  post-training quantisation of the distilled float student; both int8 models evaluated.
* ``sampled-cache``: students trained from an offline cache of the teacher, top-k (log-probs +
  rest mass) vs k sampled ids with counts at the same bytes per token, vs dense KD; the gap in
  held-out perplexity to dense KD.
* ``preference``: the teacher tilted toward number tokens (``p* ∝ p_ref exp(r / beta)``); the
  rate of number tokens in the generations of a student distilled from it vs trained on data.

Each returns ``{"seeds", "students": {name: {metric: {values, mean, std}, "curve"}}, "metric",
"reference", ...}``: the table, the verdicts and the plots read these.
"""
from __future__ import annotations

import copy
import re
import tempfile

import torch

from kdops import recipes
from kdops.cache import TeacherCache, build_cache
from kdops.demo.common import generator
from kdops.demo.language_model import LMSetup, parameters, perplexity, summarize, train

NUMBER = re.compile(r"[0-9]+")


def on_policy(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg

    def gkd(seed: int):
        """Supervised KD (the baseline's loss) for the first ``on_policy_start`` of the steps, then GKD."""
        g = generator(20_000 + seed, setup.device)
        warm_steps = round(cfg.on_policy_start * cfg.student_steps)

        def make_loss(student):
            supervised, step = setup.distill(student), [0]

            def loss(seq):
                step[0] += 1
                if step[0] <= warm_steps:
                    return supervised(seq)
                return recipes.on_policy.gkd_loss(
                    student, setup.teacher, seq, cfg.prompt_len, on_policy_fraction=cfg.on_policy_fraction,
                    divergence=cfg.on_policy_divergence, temperature=cfg.temperature, generator=g,
                    backend=setup.backend)
            return loss
        return make_loss

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
            "settings": {"on_policy_fraction": cfg.on_policy_fraction, "divergence": cfg.on_policy_divergence,
                         "on_policy_start": cfg.on_policy_start}}


def sequence_level(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    g = generator(30_000)
    starts = torch.randint(setup.student_stream.numel() - cfg.prompt_len, (cfg.corpus_sequences, 1), generator=g)
    prompts = setup.student_stream[starts + torch.arange(cfg.prompt_len)].to(setup.device)
    corpus = recipes.sequence_level.generate_corpus(setup.teacher, prompts, cfg.context + 1 - cfg.prompt_len,
                                                    temperature=1.0, generator=generator(30_001, setup.device))

    def loss(teacher):
        return lambda student: lambda seq: recipes.sequence_level.sequence_level_loss(
            student, seq, cfg.prompt_len, teacher=teacher, hard_weight=cfg.sequence_hard_weight,
            temperature=cfg.temperature, backend=setup.backend)

    per_seed: dict[str, list[dict]] = {"CE on data": [], "CE on teacher corpus": [], "CE + KD on teacher corpus": []}
    for seed in seeds:
        _, scratch = setup.baseline("from scratch", seed)
        per_seed["CE on data"].append({"perplexity": scratch[-1][1], "curve": scratch})
        for name, teacher in (("CE on teacher corpus", None), ("CE + KD on teacher corpus", setup.teacher)):
            _, curve = setup.train_student(seed, loss(teacher), f"LM student {name}", batches=setup.rows(corpus))
            per_seed[name].append({"perplexity": curve[-1][1], "curve": curve})
    return {"seeds": seeds, "students": summarize(per_seed), "metric": None,
            "corpus": {"sequences": corpus.shape[0], "prompt_len": cfg.prompt_len,
                       "generated_tokens": corpus.shape[0] * (corpus.shape[1] - cfg.prompt_len)}}


def quantized(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    activations = cfg.quantize_activations

    def calibrate(model) -> None:
        for batch in setup.student_windows[:8 * cfg.batch_size].split(cfg.batch_size):
            model(batch[:, :-1])

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
    train(tuned, cfg.preference_steps, cfg.lr, cfg.preference_steps, 50_000, setup.data(setup.stream),
          lambda seq: recipes.preference.preference_tuning_loss(tuned, setup.teacher, seq[:, :-1], reward,
                                                                beta=cfg.preference_beta, backend=setup.backend),
          lambda: perplexity(tuned, setup.held_out, cfg.context, setup.device), "LM teacher preference tuning")
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
        per_seed["KD from the tuned teacher"].append(
            {"perplexity": curve[-1][1], "preference_rate": rate(student, seed), "curve": curve})
    data_rate = preferred.cpu()[setup.held_out].float().mean().item()
    return {"seeds": seeds, "students": summarize(per_seed),
            "metric": {"key": "preference_rate", "name": "share of number tokens in its generations",
                       "lower_is_better": False},
            "reference": {"held-out data": {"preference_rate": data_rate},
                          "reference teacher": {"preference_rate": rate(setup.teacher, 0),
                                                "perplexity": setup.teacher_result["perplexity"]},
                          "tuned teacher": {"preference_rate": rate(tuned, 0), "perplexity": perplexity(
                              tuned, setup.held_out, cfg.context, setup.device)}},
            "settings": {"preferred": "number tokens ([0-9]+)", "preferred_tokens": int(preferred.sum()),
                         "beta": cfg.preference_beta, "tuning_steps": cfg.preference_steps,
                         "parameters": parameters(tuned)}}


def sampled_cache(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    windows = setup.student_windows

    def build(directory: str, mode: str, k: int) -> TeacherCache:
        batches = ((list(range(i, min(i + 256, windows.shape[0]))), windows[i:i + 256, :-1])
                   for i in range(0, windows.shape[0], 256))
        return build_cache(lambda ids: setup.teacher.lm_head(setup.teacher(ids)), batches, directory, k=k,
                           temperature=cfg.temperature, mode=mode, seed=0 if mode == "sample" else None,
                           teacher="kdops demo LM teacher", progress=False)

    def from_cache(cache: TeacherCache):
        return lambda student: lambda batch: recipes.cached.cached_distill_loss(
            student, cache, batch[0].tolist(), batch[1], hard_weight=cfg.hard_weight, backend=setup.backend)

    def batches(g: torch.Generator):
        ids = torch.randint(windows.shape[0], (cfg.batch_size,), generator=g)
        return ids, windows[ids]

    with tempfile.TemporaryDirectory() as tmp:
        topk = build(f"{tmp}/topk", "topk", cfg.cache_topk)
        topk_bytes = topk.stats()["bytes_per_token"]
        # the sampled cache's k for the top-k cache's bytes per token (bytes grow ~linearly with k)
        probe = build(f"{tmp}/probe", "sample", cfg.cache_topk).stats()["bytes_per_token"]
        k_sample = max(1, round(cfg.cache_topk * topk_bytes / probe))
        sample = build(f"{tmp}/sample", "sample", k_sample)
        caches = {f"top-{cfg.cache_topk} cache": topk, f"sampled cache, k={k_sample}": sample}
        per_seed: dict[str, list[dict]] = {"dense KD": [], **{name: [] for name in caches}}
        for seed in seeds:
            _, curve = setup.baseline("distilled", seed)
            per_seed["dense KD"].append({"perplexity": curve[-1][1], "curve": curve})
            for name, cache in caches.items():
                _, curve = setup.train_student(seed, from_cache(cache), f"LM student {name}",
                                               batches=batches)
                per_seed[name].append({"perplexity": curve[-1][1], "curve": curve})
        stats = {name: cache.stats() for name, cache in caches.items()}
    students = summarize(per_seed)
    dense = students["dense KD"]["perplexity"]["mean"]
    return {"seeds": seeds, "students": students, "metric": None,
            "gap_to_dense": {name: students[name]["perplexity"]["mean"] - dense for name in caches},
            "caches": {name: {key: s[key] for key in ("k", "bytes_per_token") if key in s}
                       | ({"coverage_mean": s["coverage_mean"]} if "coverage_mean" in s else {})
                       | ({"distinct_mean": s["distinct_mean"]} if "distinct_mean" in s else {})
                       for name, s in stats.items()}}
