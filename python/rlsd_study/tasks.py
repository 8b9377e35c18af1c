"""Task families generated in code: a question, a worked reference solution, an exact verifier.

Every response of a family has a fixed width (worked steps, ``>``, the final answer), so a batch of
prompts needs no padding. The verifier reads only the final answer, as in RL with verifiable
rewards: the worked steps are how the model gets there, not what is graded.

- ``add3``: 3-digit addition, solved column by column from the right (33 response tokens).
- ``chain``: a start digit and an affine map modulo 10 applied ``steps`` times, solved step by step
  (``steps * 8 + 3`` response tokens, 107 by default): one slip early in the chain dooms the final
  answer, so credit assignment over a long response matters.
- ``fib``: two start digits and a constant, ``x[k+1] = (x[k-1] + x[k] + c) mod 10`` solved term by
  term (``steps * 8 + 3`` response tokens, 107 by default): as long as ``chain``, but every step is
  a new computation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TEACHER_TAG = "\nref:"


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: str

    def teacher_question(self) -> str:
        """The privileged prompt: the question, then the reference solution (the official template, short)."""
        return f"{self.question}{TEACHER_TAG}{self.solution}\n"


def final_answer(response: str) -> str | None:
    """The text after the last ``>`` of a response, or ``None`` when there is no ``>``."""
    if ">" not in response:
        return None
    return response.rsplit(">", 1)[1]


def verify(problem: Problem, response: str) -> bool:
    """Exact check of the final answer (``response`` without the end-of-sequence token)."""
    return final_answer(response) == problem.answer


class Add3:
    """``123+456=`` -> ``3+6+0=09;2+5+0=07;1+4+0=05;>0579`` (digit, digit, carry in, two-digit sum)."""

    name = "add3"

    def __init__(self, **_):
        pass

    def sample(self, rng: random.Random) -> Problem:
        a, b = rng.randrange(1000), rng.randrange(1000)
        return self.make(a, b)

    @staticmethod
    def make(a: int, b: int) -> Problem:
        steps, carry = [], 0
        for i in range(3):
            da, db = (a // 10**i) % 10, (b // 10**i) % 10
            s = da + db + carry
            steps.append(f"{da}+{db}+{carry}={s:02d};")
            carry = s // 10
        answer = f"{a + b:04d}"
        return Problem(f"{a:03d}+{b:03d}=", "".join(steps) + ">" + answer, answer)


class Chain:
    """``7:*3+1=`` -> ``7*3+1=2;2*3+1=7;...>d``: the map ``x -> (x * m + c) mod 10`` applied ``steps``
    times from the start digit, one worked step per application (8 tokens each).
    """

    name = "chain"

    def __init__(self, steps: int = 13, **_):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps

    def sample(self, rng: random.Random) -> Problem:
        return self.make(rng.randrange(10), rng.randrange(2, 10), rng.randrange(10), self.steps)

    def all_problems(self) -> list[Problem]:
        """The whole space: 10 starts x 8 multipliers x 10 offsets."""
        return [self.make(s, m, c, self.steps) for s in range(10) for m in range(2, 10) for c in range(10)]

    @staticmethod
    def make(start: int, m: int, c: int, steps: int) -> Problem:
        x, worked = start, []
        for _ in range(steps):
            y = (x * m + c) % 10
            worked.append(f"{x}*{m}+{c}={y};")
            x = y
        return Problem(f"{start}:*{m}+{c}=", "".join(worked) + ">" + str(x), str(x))


class Fib:
    """``37+5=`` -> ``3+7+5=5;7+5+5=7;...>d``: the recurrence ``x[k+1] = (x[k-1] + x[k] + c) mod 10`` from
    the two start digits, ``steps`` times, one worked step per term (8 tokens each).

    Unlike ``chain`` (whose affine maps fall into cycles of a few digits within two or three steps,
    so most of a response repeats what it already wrote), every step is a new sum of three digits,
    and every one of the 1000 sums occurs in many training problems: a held-out problem is a new
    start of facts seen in training, and a slip at any step dooms the final answer.
    """

    name = "fib"

    def __init__(self, steps: int = 13, **_):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps

    def sample(self, rng: random.Random) -> Problem:
        return self.make(rng.randrange(10), rng.randrange(10), rng.randrange(10), self.steps)

    def all_problems(self) -> list[Problem]:
        """The whole space: 10 x 10 start pairs x 10 constants."""
        return [self.make(a, b, c, self.steps) for a in range(10) for b in range(10) for c in range(10)]

    @staticmethod
    def make(a: int, b: int, c: int, steps: int) -> Problem:
        worked = []
        for _ in range(steps):
            y = (a + b + c) % 10
            worked.append(f"{a}+{b}+{c}={y};")
            a, b = b, y
        return Problem(f"{worked[0][0]}{worked[0][2]}+{c}=", "".join(worked) + ">" + str(b), str(b))


FAMILIES = {"add3": Add3, "chain": Chain, "fib": Fib}


def make_task(name: str, **options):
    if name not in FAMILIES:
        raise ValueError(f"task must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name](**options)


@dataclass
class Split:
    train: list[Problem]
    test: list[Problem]


def make_split(task, num_train: int, num_test: int, seed: int = 1234) -> Split:
    """Disjoint train and test problems (by question), drawn with a fixed seed.

    A family with a small space (``all_problems``) is shuffled and cut: the test problems first, up
    to ``num_train`` of the rest for training.
    """
    rng = random.Random(seed)
    if hasattr(task, "all_problems"):
        everything = task.all_problems()
        if num_test >= len(everything):
            raise ValueError(f"num_test must be below the {len(everything)} problems of {task.name}, got {num_test}")
        rng.shuffle(everything)
        return Split(everything[num_test : num_test + num_train], everything[:num_test])
    test, seen = [], set()
    while len(test) < num_test:
        p = task.sample(rng)
        if p.question not in seen:
            seen.add(p.question)
            test.append(p)
    train = []
    attempts = 0
    while len(train) < num_train:
        attempts += 1
        if attempts > 50 * num_train + 1000:
            raise ValueError(f"could not draw {num_train} training problems disjoint from the test set")
        p = task.sample(rng)
        if p.question not in seen:
            seen.add(p.question)
            train.append(p)
    return Split(train, test)
