"""End-to-end distillation demo: ``python -m kdops.demo [--tracks ...] [--quick] [--out DIR] [--seeds 0 1 2]``.

Tracks (``--tracks``, default ``classification language-model``; ``all`` for every one), data
generated or shipped with Python (no downloads), a GPU used when present:

* ``classification`` (:mod:`kdops.demo.classification`): a wide teacher MLP, then a narrow
  student trained from hard labels, with ``kdops.distill_loss`` (soft + hard), and with that plus
  ``kdops.similarity_preserving_loss``; held-out accuracy, mean and std over seeds.
* ``language-model`` (:mod:`kdops.demo.language_model`): a causal transformer teacher and a
  smaller student over an 8192-token word vocabulary of the stdlib's sources; the student
  trained from scratch vs distilled with ``kdops.fused_linear_distill_loss``; held-out perplexity.
* the LLM recipes of :mod:`kdops.recipes` on the same teacher and student
  (:mod:`kdops.demo.recipe_tracks`): ``on-policy`` (GKD), ``sequence-level`` (teacher
  generations), ``quantized`` (int8 QAT vs PTQ), ``preference`` (a tilted teacher), and
  ``sampled-cache`` (top-k vs sampled offline soft targets at equal bytes per token).
* ``attention-relation`` (:mod:`kdops.demo.attention_relation`): the distilled student with and
  without MiniLMv2's relations of its last attention layer pulled toward the teacher's
  (``kdops.attention_relation_loss``); held-out perplexity and relation loss to the teacher.
* ``encoder`` (:mod:`kdops.demo.encoder`): a tiny BERT-style encoder (bidirectional attention
  over padded sequences, masked-token prediction on the same corpus) and a smaller student: MLM
  from scratch, prediction-layer KD, KD + MiniLMv2 relations of the last layers
  (``causal=False``, the padding as ``attention_mask``), and that + hidden-state hints through an
  adapter; held-out masked-token accuracy and perplexity, relation loss to the teacher.

LM results are mean and std over the student seeds (one teacher, trained with the first seed).
Writes ``results.json``, ``learning_curves.png`` and ``recipe_results.png`` (with matplotlib) to
``--out`` and prints a table and one verdict per comparison, which says so when a recipe does not
beat its baseline.

What mattered (tuned as a practitioner would):

* Where distillation helps: the teacher must know something the student's labels do not tell.
  Here the teacher trains on 20x (classification) or ~5x (LM) more data than the student, and
  the classification labels carry 40% symmetric noise: the student overfits the noise from hard
  labels alone (its accuracy peaks, then falls), while the teacher's soft targets are denoised.
* Classification (3 seeds, KD student): the hard-label weight mattered, the temperature hardly.
  With the labels this noisy, little weight on them is best: hard_weight 0.1 gives 73.1-73.6%
  at T = 1, 2, 4, 8 and 0.5 gives 70.2-71.3%. The demo uses T = 4, hard_weight = 0.1: the
  distilled student then passes its teacher (73.1% vs 71.2%; hard labels alone 57.8%). The SP
  term (weight 1000, so that it is comparable to the KD term) adds a little on top (+1.3
  points, seed spread 0.6), but that gain depends on the setup: with a 256-wide teacher trained
  on 20k examples SP added nothing (0.0 to -0.7 points at weights 1000 to 10000).
* Language modelling (held-out perplexity of the distilled student after 300 steps, the default
  before the recipe tracks made 200 the budget; from scratch 102.3): the
  temperature mattered: T = 1 gives 57.9, T = 2 64.9, T = 4 69.4 (hard_weight 0.2); at T = 1
  hard_weight 0 gives 58.3 and 0.5 gives 62.7. The demo uses T = 1, hard_weight = 0.2: the
  full-vocabulary soft targets tell the student far more per token than the next token alone.
* Recipes (3 seeds, 200 student steps; README "The main job" has the table): token-level KD on
  the data stays the strongest signal at this scale. GKD improves the teacher's score of the
  student's generations, not held-out perplexity; a teacher-generated corpus helps over the data
  alone but not as much as soft targets; int8 PTQ is already lossless, so QAT has nothing to
  recover (and over 200 steps costs perplexity); KD carries a tuned teacher's preference into
  the student; at equal bytes per token a sampled cache comes within 3 perplexity of dense KD
  where top-8 stays 22 away. The last-layer attention relations (weight 1, untuned) add to
  token-level KD: 61.5 vs 64.2 held-out perplexity.
* Threads: on a shared 2-core machine one torch thread is several times faster than two
  (oversubscribed OpenMP threads spin), hence ``--threads 1`` by default.
"""
from kdops.demo.run import main

__all__ = ["main"]
