"""Answer extraction and the cheap, exact half of answer checking: strings and plain numbers.

Everything here is linear-time string work that cannot hang, so it runs in the trainer's process; only answers
that are neither equal strings nor plain numbers go to the sympy worker (checker.py).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from r1forge.data.tags import ANSWER_END, ANSWER_START

MAX_ANSWER_CHARS = 2000  # a longer "answer" is not an answer; it is never sent to sympy
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.S)  # an escaped char, or a brace


def match_brace(text: str, open_idx: int) -> int:
    """Index of the "}" closing the "{" at `open_idx`, or -1 if unbalanced. `\\{` and `\\}` are not braces."""
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces matched; None if absent
    or unbalanced."""
    idx = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        end = match_brace(text, j)
        return None if end < 0 else text[j + 1 : end]
    if j > i:  # "\boxed 5": the next space-delimited token
        m = re.match(r"[^\s$]+", text[j:])
        return m.group() if m else None
    return None


def extract_answer(completion: str) -> str | None:
    """The model's final answer: the LAST `<answer>...</answer>` (a boxed answer inside it wins), else the last
    `\\boxed{}`; None when there is none, or when the last `<answer>` is never closed."""
    start = completion.rfind(ANSWER_START)
    if start >= 0:
        end = completion.find(ANSWER_END, start + len(ANSWER_START))
        if end < 0:
            return None
        content = completion[start + len(ANSWER_START) : end]
        boxed = extract_boxed(content)
        content = boxed if boxed is not None else content
    else:
        content = extract_boxed(completion)
    if content is None or not content.strip():
        return None
    return content.strip()


def reference_answer(answer: Any) -> str | None:
    """The reference answer as a string: numbers as written, GSM8K's "... #### 72" as "72", a boxed reference as
    its content; None (nothing to compare against) for None, NaN or an empty string."""
    if answer is None or isinstance(answer, bool):
        return None if answer is None else str(answer)
    if isinstance(answer, float):
        if answer != answer or answer in (float("inf"), float("-inf")):
            return None
        return repr(answer)
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.strip()
    return text or None


_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_UNWRAP = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT = re.compile(r"(.*?)\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}")
_DROP = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle|\\[!,;:]|\^\s*\{?\\circ\}?|°")


def normalize_answer(text: str) -> str:
    """Canonical spelling of an answer: no math delimiters, `\\left`/`\\right`, spacing commands, degree signs,
    currency signs, text wrappers or trailing full stop; `\\dfrac`/`\\tfrac` as `\\frac`; one space at most."""
    s = text.strip().replace("\u2212", "-")
    changed = True
    while changed:
        changed = False
        for left, right in _DELIMS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s, changed = s[len(left) : len(s) - len(right)].strip(), True
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DROP.sub("", s)
    unit = _UNIT.fullmatch(s)
    if unit and parse_number(unit.group(1)) is not None:
        s = unit.group(1)
    s = _UNWRAP.sub(r"\1", s)
    s = re.sub(r"\s+", " ", s).strip()
    while s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def strip_assignment(pred: str, gold: str) -> tuple[str, str]:
    """`x = 5` against `5`: drop a single-variable left-hand side on whichever side the other lacks."""
    assign = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(.+)", re.S)
    if "=" not in gold and (m := assign.fullmatch(pred)):
        pred = m.group(1).strip()
    if "=" not in pred and (m := assign.fullmatch(gold)):
        gold = m.group(1).strip()
    return pred, gold


def compare_key(s: str) -> str:
    """What two answers must share to be equal as strings: the normalised text without spaces."""
    return s.replace(" ", "")


_NUM = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,4})?"
_DECIMAL = re.compile(_NUM)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_FRAC = re.compile(rf"(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_FRAC_SHORT = re.compile(r"(-?)\\frac(\d)(\d)")


def _fraction(num: str) -> Fraction:
    return Fraction(Decimal(num))


def parse_number(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, is_percent) for a plain number: `-3`, `1,000`, `0.50`, `5.`, `1e-3`, `1/2`, `\\frac{1}{2}`,
    `\\frac12`, `50%`; None for anything else (including a zero denominator)."""
    t = text.replace(" ", "")
    if len(t) > 200:
        return None
    percent = t.endswith("%")
    if percent:
        t = t[:-1]
    if t.startswith("+"):
        t = t[1:]
    try:
        if _DECIMAL.fullmatch(t):
            return _fraction(t), percent
        if _THOUSANDS.fullmatch(t):
            return _fraction(t.replace(",", "")), percent
        for pattern in (_FRAC, _FRAC_SHORT):
            if m := pattern.fullmatch(t):
                den = _fraction(m.group(3))
                if den == 0:
                    return None
                value = _fraction(m.group(2)) / den
                return (-value if m.group(1) else value), percent
        if m := _SLASH.fullmatch(t):
            den = _fraction(m.group(2))
            return (None if den == 0 else (_fraction(m.group(1)) / den, percent))
    except (InvalidOperation, ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool], rel_tol: float = 1e-9) -> bool:
    """Equal values (to `rel_tol`); a percentage also equals its value over 100 (`50%` == `0.5` == `50`)."""

    def close(x: Fraction, y: Fraction) -> bool:
        return x == y or abs(x - y) <= Fraction(rel_tol) * max(abs(x), abs(y))

    (va, pa), (vb, pb) = a, b
    if close(va, vb):
        return True
    if pa and not pb:
        return close(va / 100, vb)
    if pb and not pa:
        return close(va, vb / 100)
    return False
