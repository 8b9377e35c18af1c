"""Trainer integrations, each imported only when asked for.

- ``rlsd_kernels.integrations.teacher``: the trainer-independent teacher inputs (the privileged
  context in the prompt, the sampled completion at the same positions from the end); its weight
  policies (live, frozen, snapshot, EMA) are in ``teacher_weights`` (also importable from ``teacher``).
- ``rlsd_kernels.integrations.trl``: ``RLSDConfig`` and ``RLSDTrainer`` for TRL's GRPO trainer.
- ``rlsd_kernels.integrations.verl``: the ``"rlsd"`` policy loss in verl's registry and its config.

This package imports nothing itself, so ``import rlsd_kernels`` never pulls in a trainer.
"""
