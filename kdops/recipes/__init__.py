"""LLM distillation recipes built on kdops' losses (each a small module, used by the demo's tracks):

* :mod:`kdops.recipes.generation`: sampling from a causal LM, CE and token-level KD on the
  tokens it continued a prompt with;
* :mod:`kdops.recipes.on_policy`: on-policy distillation (GKD): reverse KL / generalized JSD on
  the student's own samples;
* :mod:`kdops.recipes.sequence_level`: a corpus generated once by the teacher, CE (+ KD) on it;
* :mod:`kdops.recipes.quantized`: int8 fake-quantised student (torch.ao) trained with KD, and
  post-training quantisation to compare with;
* :mod:`kdops.recipes.preference`: a teacher tilted toward a per-token reward, and the
  preference's rate in generations;
* :mod:`kdops.recipes.cached`: the student trained from an offline cache of the teacher, top-k
  or sampled soft targets.

A model is any ``nn.Module`` mapping ids ``(B, L)`` to hidden states ``(B, L, H)`` with an
``lm_head`` (:class:`kdops.recipes.generation.CausalLM`).
"""
from kdops.recipes import cached, generation, on_policy, preference, quantized, sequence_level

__all__ = ["cached", "generation", "on_policy", "preference", "quantized", "sequence_level"]
