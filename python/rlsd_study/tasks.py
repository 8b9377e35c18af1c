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
- ``sum``: ``terms`` two-digit numbers added left to right, each addition worked column by column
  like ``add3`` (``(terms - 1) * 34 + 5`` response tokens, 107 for the default 4 terms): every step
  is the short task's skill, and one slip in any column dooms the final total.
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
    size = 1000 * 1000  # distinct questions

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

    size = 10 * 8 * 10

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

    size = 10 * 10 * 10

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


class RunningSum:
    """``37+48+92+15=`` -> ``037+48:7+8+0=15;3+4+1=08;0+0+0=00;085+92:...;177+15:...;>192``.

    Each addition restates the running total (three digits) and the next number, then works the
    three columns from the right as ``add3`` does (digit, digit, carry in, two-digit sum); the next
    running total is the low digits of those columns. The final answer is the total, three digits.
    The space is ``100 ** terms`` problems, so held-out problems are new sequences of column sums
    that all occur in training.
    """

    name = "sum"

    def __init__(self, terms: int = 4, **_):
        if not 2 <= terms <= 10:
            raise ValueError(f"terms must be in [2, 10] (the total must fit in three digits), got {terms}")
        self.terms = terms
        self.size = 100**terms

    def sample(self, rng: random.Random) -> Problem:
        return self.make([rng.randrange(100) for _ in range(self.terms)])

    @staticmethod
    def make(numbers: list[int]) -> Problem:
        if not numbers or any(not 0 <= n < 100 for n in numbers) or sum(numbers) > 999:
            raise ValueError(f"numbers must be two-digit (0-99) with a total below 1000, got {numbers}")
        worked, total = RunningSum.work(numbers[0], numbers[1:])
        answer = f"{total:03d}"
        question = "+".join(f"{n:02d}" for n in numbers) + "="
        return Problem(question, worked + ">" + answer, answer)

    @staticmethod
    def work(total: int, numbers: list[int]) -> tuple[str, int]:
        """The worked additions of ``numbers`` to the running ``total``, and the final total."""
        worked = []
        for n in numbers:
            worked.append(f"{total:03d}+{n:02d}:")
            carry = 0
            for i in range(3):
                dt, dn = (total // 10**i) % 10, (n // 10**i) % 10
                s = dt + dn + carry
                worked.append(f"{dt}+{dn}+{carry}={s:02d};")
                carry = s // 10
            total += n
        return "".join(worked), total


FAMILIES = {"add3": Add3, "chain": Chain, "fib": Fib, "sum": RunningSum}


def make_task(name: str, **options):
    if name not in FAMILIES:
        raise ValueError(f"task must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name](**options)


@dataclass
class Split:
    train: list[Problem]
    test: list[Problem]


def split_sizes(task, num_train: int, num_test: int) -> tuple[int, int]:
    """The (train, test) sizes ``make_split`` gives; ``ValueError`` where the family's space is too small.

    A family with ``all_problems`` keeps the test problems and up to ``num_train`` of the rest; a
    sampled family needs ``num_train + num_test`` distinct questions.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    if hasattr(task, "all_problems"):
        if num_test >= task.size:
            raise ValueError(f"num_test must be below the {task.size} problems of {task.name}, got {num_test}")
        return min(num_train, task.size - num_test), num_test
    if num_train + num_test > task.size:
        raise ValueError(f"num_train + num_test must be at most the {task.size} problems of {task.name}, "
                         f"got {num_train} + {num_test}")
    return num_train, num_test


def make_split(task, num_train: int, num_test: int, seed: int = 1234) -> Split:
    """Disjoint train and test problems (by question), drawn with a fixed seed.

    A family with a small space (``all_problems``) is shuffled and cut: the test problems first, up
    to ``num_train`` of the rest for training.
    """
    split_sizes(task, num_train, num_test)
    rng = random.Random(seed)
    if hasattr(task, "all_problems"):
        everything = task.all_problems()
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
