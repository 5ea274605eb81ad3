"""Built-in synthetic corpora, generated from a seed (nothing downloaded): worked arithmetic and algebra problems.

Three kinds of problems, each solved in explicit steps `"a op b = c."` (every step is a Python expression, its
result and a full stop, so a checker can `eval` it):

- word: "A shop has 23 boxes of 7 pens. It sells 45 pens. How many pens are left?" -> "23 * 7 = 161.",
  "161 - 45 = 116."; chains of buying, selling, doubling and sharing equally.
- expression: "Compute (12 + 7) * 3." -> "12 + 7 = 19.", "19 * 3 = 57."; precedence included ("4 + 3 * 5").
- equation: "Solve for x: 3x + 7 = 25." -> "25 - 7 = 18.", "18 / 3 = 6."; one to three steps.

Difficulty is the number of steps (`min_steps`..`max_steps`, one operation each) and `max_operand`. Numbers are
kept small so a ~10M-parameter model learns them in minutes: operands mostly below 100, every intermediate
result and answer a whole number in [0, 1000).

Train/test split rule: a problem's identity is its chain of computations, the steps joined by newlines
(wording, names, objects and kind left out). It belongs to the test split when the first 8 bytes of the
SHA-256 of that key, as an integer, are divisible by 10 (about 10% of all problems); otherwise to train.
`make_problems` keeps drawing candidates until it has n of the requested split, so the two splits are
disjoint by construction, for every seed: a test problem never repeats a train problem's computation,
however it is worded. Within one call problems are also unique.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from r1forge.data.tags import ANSWER_END, ANSWER_START, THINK_END, THINK_START

TEST_MODULUS = 10  # one problem in TEST_MODULUS belongs to the test split
MAX_RESULT = 999
MAX_STEPS = 10  # longest solution make_problems builds

NAMES = ("Tom", "Mia", "Sam", "Lily", "Ben", "Emma", "Max", "Zoe", "Leo", "Ava", "Noah", "Ella", "Jack", "Ruby",
         "Omar", "Nina", "Ivan", "Sara", "Kai", "Lena")
PLACES = (("A shop", "the shop"), ("A farmer", "the farmer"), ("A baker", "the baker"), ("A teacher", "the teacher"),
          ("A school", "the school"), ("A library", "the library"))
OBJECTS = ("pens", "apples", "books", "cookies", "marbles", "stickers", "cards", "eggs", "pencils", "balls",
           "candles", "cups", "shells", "stamps", "toys", "oranges", "bottles", "flowers", "coins", "buttons")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("crate", "crates"), ("basket", "baskets"),
              ("jar", "jars"), ("tray", "trays"))
KINDS = ("word", "expression", "equation")


@dataclass
class Problem:
    """A question, its solution steps ("a op b = c.") and the final answer (an integer, as text)."""

    question: str
    steps: list[str]
    answer: str
    kind: str = "word"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The canonical form that decides the split: the chain of computations."""
        return "\n".join(self.steps)


def problem_split(problem: Problem) -> str:
    """"test" or "train", from a hash of the problem's computations (see the module docstring)."""
    digest = hashlib.sha256(problem.key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_MODULUS == 0 else "train"


def _step(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}."


def _divisors(v: int, low: int = 2, high: int = 12) -> list[int]:
    return [d for d in range(low, high + 1) if v % d == 0 and v // d >= 2]


def _word_problem(rng: random.Random, n_steps: int, max_operand: int) -> Problem:
    if rng.random() < 0.5:
        name = rng.choice(NAMES)
        first, later = name, name
    else:
        first, later = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    container, containers = rng.choice(CONTAINERS)
    sentences, steps = [], []
    if rng.random() < 0.5:  # start with a product: "has 23 boxes of 7 pens"
        b = rng.randint(2, 12)
        a = rng.randint(2, min(max_operand, MAX_RESULT // b))
        v = a * b
        sentences.append(f"{first} has {a} {containers} of {b} {obj}.")
        steps.append(_step(a, "*", b, v))
    else:
        v = rng.randint(2, max_operand)
        sentences.append(f"{first} has {v} {obj}.")
    subject = later[0].upper() + later[1:]
    question = rng.choice((f"How many {obj} does {later} have now?", f"How many {obj} are there now?"))
    last_op = None
    while len(steps) < n_steps:
        is_last = len(steps) == n_steps - 1
        options = ["add"] * (v + 2 <= MAX_RESULT) + ["sub"] * (v >= 3) + ["mul"] * (v * 2 <= MAX_RESULT)
        if is_last and _divisors(v):
            options.append("div")
        op = rng.choice(options)
        if op == "add":
            n = rng.randint(2, min(max_operand, MAX_RESULT - v))
            giver = rng.choice([x for x in NAMES if x != later])
            sentences.append(rng.choice((f"{subject} buys {n} more {obj}.", f"{subject} finds {n} more {obj}.",
                                         f"{giver} gives {later} {n} {obj}.", f"{subject} gets {n} more {obj}.")))
            steps.append(_step(v, "+", n, v + n))
            v += n
        elif op == "sub":
            n = rng.randint(2, min(max_operand, v - 1))
            sentences.append(rng.choice((f"{subject} sells {n} {obj}.", f"{subject} gives away {n} {obj}.",
                                         f"{subject} loses {n} {obj}.", f"{subject} uses {n} {obj}.")))
            steps.append(_step(v, "-", n, v - n))
            v -= n
        elif op == "mul":
            m = 3 if v * 3 <= MAX_RESULT and rng.random() < 0.4 else 2
            sentences.append(f"The number of {obj} {'triples' if m == 3 else 'doubles'}.")
            steps.append(_step(v, "*", m, v * m))
            v *= m
        else:
            d = rng.choice(_divisors(v))
            if rng.random() < 0.5:
                sentences.append(f"{subject} puts the {obj} into {d} {containers}, the same number in each.")
                question = f"How many {obj} are in each {container}?"
            else:
                sentences.append(f"{subject} shares the {obj} equally among {d} friends.")
                question = f"How many {obj} does each friend get?"
            steps.append(_step(v, "/", d, v // d))
            v //= d
        last_op = op
    if last_op == "sub" and rng.random() < 0.5:
        question = f"How many {obj} are left?"
    return Problem(" ".join(sentences + [question]), steps, str(v), "word")


def _expression_problem(rng: random.Random, n_steps: int, max_operand: int) -> Problem:
    v = rng.randint(2, max_operand)
    expr, outer = str(v), 0  # outer: precedence of the outermost operator (0 atom, 1 + -, 2 * /)
    steps: list[str] = []
    while len(steps) < n_steps:
        remaining = n_steps - len(steps)
        options = ["+"] * (v + 2 <= MAX_RESULT) + ["-"] * (v >= 2) + ["*"] * (v * 2 <= MAX_RESULT)
        options += ["/"] * bool(_divisors(v)) + ["+*"] * (remaining >= 2 and v + 4 <= MAX_RESULT)
        op = rng.choice(options)
        if op == "+*":  # "v + b * c": the product first, then the sum
            b = rng.randint(2, min(12, (MAX_RESULT - v) // 2))
            c = rng.randint(2, min(12, (MAX_RESULT - v) // b))
            expr, outer = f"{expr} + {b} * {c}", 1
            steps += [_step(b, "*", c, b * c), _step(v, "+", b * c, v + b * c)]
            v += b * c
            continue
        if op == "+":
            n = rng.randint(2, min(max_operand, MAX_RESULT - v))
            r = v + n
        elif op == "-":
            n = rng.randint(1, min(max_operand, v - 1))  # results stay >= 1
            r = v - n
        elif op == "*":
            n = rng.randint(2, min(12, MAX_RESULT // v))
            r = v * n
        else:
            n = rng.choice(_divisors(v))
            r = v // n
        if op in "*/" and outer == 1:
            expr = f"({expr})"
        expr, outer = f"{expr} {op} {n}", 1 if op in "+-" else 2
        steps.append(_step(v, op, n, r))
        v = r
    question = rng.choice((f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr}.",
                           f"Find the value of {expr}."))
    return Problem(question, steps, str(v), "expression", {"expression": expr})


def _term(a: int) -> str:
    return "x" if a == 1 else f"{a}x"


def _equation_problem(rng: random.Random, n_steps: int, max_operand: int) -> Problem:
    x = rng.randint(1, 20)
    form = rng.choice({1: ("add", "sub", "mul"), 2: ("axb", "axmb", "xdivb", "paren"), 3: ("both",)}[n_steps])
    if form == "add":
        b = rng.randint(1, max_operand)
        eq, steps = f"x + {b} = {x + b}", [_step(x + b, "-", b, x)]
    elif form == "sub":  # x = b + c, so both sides stay positive
        b, c = rng.randint(1, max_operand), rng.randint(1, max_operand)
        x = b + c
        eq, steps = f"x - {b} = {c}", [_step(c, "+", b, x)]
    elif form == "mul":
        a = rng.randint(2, 12)
        eq, steps = f"{a}x = {a * x}", [_step(a * x, "/", a, x)]
    elif form in ("axb", "axmb"):
        a = rng.randint(2, 9)
        b = rng.randint(1, min(max_operand, a * x - 1) if form == "axmb" else max_operand)
        c = a * x + b if form == "axb" else a * x - b
        eq = f"{a}x {'+' if form == 'axb' else '-'} {b} = {c}"
        first = _step(c, "-", b, a * x) if form == "axb" else _step(c, "+", b, a * x)
        steps = [first, _step(a * x, "/", a, x)]
    elif form == "xdivb":
        a = rng.randint(2, 9)
        x = a * rng.randint(1, 12)
        b = rng.randint(1, max_operand)
        eq, steps = f"x / {a} + {b} = {x // a + b}", [_step(x // a + b, "-", b, x // a), _step(x // a, "*", a, x)]
    elif form == "paren":
        a = rng.randint(2, 9)
        b = rng.randint(1, min(max_operand, MAX_RESULT // a - x))
        eq, steps = f"{a}(x + {b}) = {a * (x + b)}", [_step(a * (x + b), "/", a, x + b), _step(x + b, "-", b, x)]
    else:  # ax + b = cx + d
        a = rng.randint(2, 9)
        c = rng.randint(1, a - 1)
        b = rng.randint(1, max_operand)
        d = (a - c) * x + b
        eq = f"{_term(a)} + {b} = {_term(c)} + {d}"
        steps = [_step(d, "-", b, d - b), _step(a, "-", c, a - c), _step(d - b, "/", a - c, x)]
    question = rng.choice((f"Solve for x: {eq}.", f"Find x if {eq}.", f"What is x if {eq}?"))
    return Problem(question, steps, str(x), "equation", {"equation": eq})


def _largest_number(problem: Problem) -> int:
    """The largest number in the problem's steps (operands and results)."""
    return max(int(tok) for step in problem.steps for tok in step.rstrip(".").split() if tok.isdigit())


def make_problems(n: int, seed: int, split: str = "train", min_steps: int = 1, max_steps: int = 3,
                  max_operand: int = 99, kinds: tuple[str, ...] = KINDS, max_result: int = MAX_RESULT) -> list[Problem]:
    """n distinct problems of one split, deterministic in (seed, split, arguments).

    Args:
        n: how many.
        seed: generator seed; train and test are disjoint for any pair of seeds.
        split: "train" or "test".
        min_steps, max_steps: solution length range (each count about equally likely; equations stop at 3).
        max_operand: largest starting number or added/subtracted operand (2..999).
        max_result: largest number any step may produce (max_operand..999); a candidate going beyond is drawn
            again. Small values keep every step a fact a tiny model can learn, so that the difficulty is the
            number of steps, not the size of the numbers.
        kinds: subset of ("word", "expression", "equation").
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= {MAX_STEPS}, got min_steps={min_steps}, max_steps={max_steps}")
    if not 2 <= max_operand <= MAX_RESULT:
        raise ValueError(f"max_operand must be in [2, {MAX_RESULT}], got {max_operand}")
    if not max_operand <= max_result <= MAX_RESULT:
        raise ValueError(f"max_result must be in [max_operand={max_operand}, {MAX_RESULT}], got {max_result}")
    unknown = set(kinds) - set(KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    makers = {"word": _word_problem, "expression": _expression_problem, "equation": _equation_problem}
    rng = random.Random(f"r1forge-synthetic:{seed}:{split}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not make {n} distinct {split} problems with steps {min_steps}..{max_steps}: "
                             "ask for fewer or widen max_steps / max_operand")
        steps = rng.randint(min_steps, max_steps)
        allowed = [k for k in kinds if k != "equation" or steps <= 3]
        if not allowed:
            continue
        problem = makers[rng.choice(allowed)](rng, steps, max_operand)
        if max_result < MAX_RESULT and _largest_number(problem) > max_result:
            continue
        if problem.key in seen or problem_split(problem) != split:
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


# DeepSeek-R1 paper, Table 1. The paper writes "User: prompt. Assistant:"; questions here end in "?", so no
# period is added after them.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question} Assistant:"
)


def pretrain_text(problem: Problem, tagged: bool = False) -> str:
    """A plain worked solution: the question, one step per line, the answer; with tagged=True the same in the
    R1 output format (`<think>` steps `</think>` `<answer>` answer `</answer>`), as text on the web sometimes is."""
    if tagged:
        steps = "\n".join(problem.steps)
        return f"{problem.question}\n{THINK_START}\n{steps}\n{THINK_END}\n{ANSWER_START}{problem.answer}{ANSWER_END}"
    return "\n".join([problem.question, *problem.steps, f"The answer is {problem.answer}."])


def _coin(tag: str, seed: int, problem: Problem, p: float) -> bool:
    """A seeded coin per problem (its own stream: drawing it changes no other random choice)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    digest = hashlib.sha256(f"{tag}:{seed}:{problem.key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < p


def sft_messages(problem: Problem, show_steps: bool = True) -> list[dict[str, str]]:
    """A cold-start SFT conversation: `<think>` steps `</think>` then `<answer>`; with show_steps=False the
    reasoning is left empty (`<think>\n</think>`), a terse answer in the same well-formed format."""
    steps = "\n".join(problem.steps) + "\n" if show_steps else ""
    return [{"role": "user", "content": problem.question},
            {"role": "assistant",
             "content": f"{THINK_START}\n{steps}{THINK_END}\n{ANSWER_START}{problem.answer}{ANSWER_END}"}]


def shows_steps(problem: Problem, fraction: float, seed: int) -> bool:
    """Whether a cold-start conversation writes this problem's steps out: a seeded coin per problem with
    P(True) = fraction, independent of the number of steps, so the cold start never teaches *when* to reason
    (that is what RL is left to discover: on the problems where written-out steps pay)."""
    return _coin("r1forge-steps", seed, problem, fraction)


def rl_example(problem: Problem) -> dict[str, Any]:
    """An RL prompt with its reference answer.

    Returns:
        prompt: the R1-Zero template (DeepSeek-R1 paper, Table 1) around the question, plain text for RL
            straight from a base model; messages: the question as a user turn, for RL through the chat
            template after cold-start SFT; answer: the reference; question; kind; steps: the solution's
            number of steps (its difficulty, for per-difficulty reports).
    """
    return {"prompt": R1_ZERO_TEMPLATE.format(question=problem.question), "answer": problem.answer,
            "messages": [{"role": "user", "content": problem.question}], "question": problem.question,
            "kind": problem.kind, "steps": len(problem.steps)}


_ANIMALS = ("cat", "dog", "bird", "horse", "rabbit", "duck", "fox", "cow")
_ADJECTIVES = ("small", "big", "red", "happy", "quiet", "old", "new", "green", "busy", "warm")
_VENUES = ("park", "market", "river", "garden", "school", "station", "beach", "library", "farm", "village")
_THINGS = ("kite", "hat", "bike", "book", "lamp", "chair", "boat", "clock", "drum", "map")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_SENTENCES = (
    "{name} has a {adj} {thing}.", "{name} walks to the {venue} with {name2}.", "The {animal} is {adj}.",
    "{name} likes {obj}.", "On {day}, {name} goes to the {venue}.", "The {adj} {animal} sleeps near the {venue}.",
    "{name} and {name2} play with a {thing}.", "{name} reads a book about a {animal}.",
    "The {venue} is {adj} today.", "{name} gives {name2} a {adj} {thing}.", "A {animal} runs across the {venue}.",
    "{name} counts the {obj} on the table.", "In the morning, {name} feeds the {animal}.",
    "{name2} paints a {adj} {thing} for {name}.", "The {thing} is next to the {animal}.",
)


def _english_paragraph(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 6)):
        name, name2 = rng.sample(NAMES, 2)
        out.append(rng.choice(_SENTENCES).format(
            name=name, name2=name2, adj=rng.choice(_ADJECTIVES), thing=rng.choice(_THINGS),
            animal=rng.choice(_ANIMALS), venue=rng.choice(_VENUES), obj=rng.choice(OBJECTS), day=rng.choice(_DAYS)))
    return " ".join(out)


def make_pretrain_corpus(n_docs: int, seed: int, problem_fraction: float = 0.7, min_steps: int = 1,
                         max_steps: int = 3, max_operand: int = 99, kinds: tuple[str, ...] = KINDS,
                         max_result: int = MAX_RESULT, tagged_fraction: float = 0.0) -> list[str]:
    """Documents for tokenizer training and pretraining: worked train-split problems and templated English.

    A problem document holds one to three worked problems (`pretrain_text`; a `tagged_fraction` of them in the
    `<think>`/`<answer>` format, which is what lets RL straight from this base, R1-Zero, find the tags at all),
    an English one two to six simple sentences. Only train-split problems are used, so test problems never leak
    into pretraining.
    """
    if not 0.0 <= problem_fraction <= 1.0:
        raise ValueError(f"problem_fraction must be in [0, 1], got {problem_fraction}")
    rng = random.Random(f"r1forge-corpus:{seed}")
    counts = [rng.randint(1, 3) if rng.random() < problem_fraction else 0 for _ in range(n_docs)]
    problems = iter(make_problems(sum(counts), seed, "train", min_steps, max_steps, max_operand, kinds, max_result))
    worked = lambda p: pretrain_text(p, _coin("r1forge-tagged", seed, p, tagged_fraction))  # noqa: E731
    return ["\n\n".join(worked(next(problems)) for _ in range(c)) if c else _english_paragraph(rng)
            for c in counts]
