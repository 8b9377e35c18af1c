"""Bits of the per-token int32 ``flags`` that the fused kernels write.

The low bits say which clip was taken for a token (what a trainer logs); the high bits are input
errors, which the launchers turn into exceptions when ``validate=True``.
"""

import enum


class Flag(enum.IntFlag):
    WEIGHT_CLIP_LOW = 1
    WEIGHT_CLIP_HIGH = 2
    PPO_CLIP_LOW = 4
    PPO_CLIP_HIGH = 8
    DUAL_CLIP = 16
    BAD_TOKEN = 32
    NONFINITE_STUDENT = 64
    NONFINITE_TEACHER = 128


ERRORS = Flag.BAD_TOKEN | Flag.NONFINITE_STUDENT | Flag.NONFINITE_TEACHER

# Every error bit lies above every other bit, and the flags are never negative: a token has an
# error exactly when its flags reach this value (one reduction finds whether any token has one).
LOWEST_ERROR = int(Flag.BAD_TOKEN)
