"""Knowledge distillation by algorithm: one module per objective family, the training loop on its own.

- ``vanilla``: token-level KD, a divergence (``telekd.losses``) over the aligned answer positions;
- ``dskd``: Dual-Space KD (Zhang et al., EMNLP 2024; songmzhang/DSKD): projectors, the same-vocabulary loss and
  cross-model attention (CMA) for two vocabularies;
- ``uld``: Universal Logit Distillation (Boizard et al., 2024);
- ``targets``: the index helpers the terms share (rows of the cached teacher targets);
- ``loop``: the training loop (KDConfig, train_kd) and ``run``: the kd stages' shared flow.

A term is built once per cell, ``make(targets, pairs) -> term``, and called per batch as
``term(logits, hidden, batch, idx) -> (kd loss, {name: float})``.
"""
