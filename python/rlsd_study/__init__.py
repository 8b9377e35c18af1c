"""A small-scale study of RLSD against GRPO, OPSD and GRPO+OPSD on tasks with verifiable answers.

Run ``python -m python.rlsd_study --help`` from the repository root. See ``docs/study.md``.
"""
