"""kdops inside the training stacks people already use (each submodule imports its library):

* :mod:`kdops.integrations.trl`: ``patch()`` routes TRL's ``DistillationTrainer`` and
  ``GKDTrainer`` losses through kdops kernels (``unpatch()`` restores them).
* :mod:`kdops.integrations.transformers`: a ``transformers.Trainer`` for offline distillation from
  a teacher model or a :class:`kdops.cache.TeacherCache`, on hidden states and ``lm_head`` weights.
"""
