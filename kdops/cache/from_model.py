"""Teacher caches from a local Transformers causal language model and a text corpus
(``python -m kdops.cache build``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from kdops.cache import TeacherCache, build_cache


def read_corpus(path: Union[str, os.PathLike]) -> list[str]:
    """The texts of a corpus file: JSONL (``.jsonl`` / ``.json``: one JSON object per line with a
    ``"text"`` string; blank lines skipped) or plain text (one example per non-blank line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix not in (".jsonl", ".json"):
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{number} is not a JSON object: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{number} has no "text" string field')
        texts.append(record["text"])
    return texts


def build_cache_from_model(
    model_dir: Union[str, os.PathLike],
    data: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    k: int = 32,
    temperature: float = 1.0,
    mode: str = "topk",
    seed: Optional[int] = None,
    dtype: Optional[str] = None,
    max_length: int = 512,
    batch_size: int = 8,
    device: Optional[str] = None,
    progress: bool = True,
) -> TeacherCache:
    """Runs the causal LM saved (``save_pretrained``) in ``model_dir``, with its tokenizer, over
    the texts of ``data`` (:func:`read_corpus`) and caches its soft targets at ``out`` (as
    :func:`kdops.cache.build_cache`): example id ``n`` is the corpus' ``n``-th text, truncated
    to ``max_length`` tokens; its row ``i`` is the teacher's distribution at position ``i`` (of
    the token after token ``i``), padding dropped. Texts already in the cache are skipped, so
    the same command resumes an interrupted run. ``device``: default CUDA if available."""
    for name, value in (("max_length", max_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"building a cache from a model needs transformers (pip install transformers): {e}") from None
    texts = read_corpus(data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {model_dir} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    done = set(TeacherCache(out).example_ids()) if (Path(out) / "manifest.json").exists() else set()
    todo = [n for n in range(len(texts)) if n not in done]

    def batches() -> Iterator[tuple[list[int], dict, list[int]]]:
        for first in range(0, len(todo), batch_size):
            ids = todo[first:first + batch_size]
            encoded = tokenizer([texts[n] for n in ids], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
            lengths = encoded["attention_mask"].sum(1).tolist()
            yield ids, {key: value.to(device) for key, value in encoded.items()}, lengths

    def teacher(inputs: dict) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits

    if not todo:
        return TeacherCache(out, mode=mode, k=k, temperature=temperature)  # settings checked
    return build_cache(teacher, batches(), out, k=k, temperature=temperature, mode=mode, seed=seed, dtype=dtype,
                       teacher=Path(model_dir).resolve().name, total=math.ceil(len(todo) / batch_size),
                       progress=progress)
