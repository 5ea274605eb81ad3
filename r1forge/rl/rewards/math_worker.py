"""Symbolic answer equivalence with sympy (and math-verify when importable), run in a separate process.

Why a process: sympy can take seconds, or forever (`9^{9^{9}}` is a 370-million-digit integer), and much of
that time is spent in C code that holds the GIL, so neither a thread (cannot be stopped, and blocks the trainer)
nor a signal alarm (main thread only, and only between bytecodes) bounds it. The parent (checker.py) kills this
process when a reply is late and starts a new one on the next request. It also keeps `eval`-based parsing of
model output out of the trainer's address space: the input is whitelisted before sympy sees it as well.

Protocol: one JSON object per line. After start-up it writes {"ready": true, "math_verify": bool}; then for each
request {"id", "pred", "gold", "math_verify"} it writes {"id", "equal": true | false | null, "error": str | null}
where null means "not parsable as math". Runs standalone (no r1forge import) so it starts in about a second.
"""

from __future__ import annotations

import json
import re
import sys
from tokenize import TokenError
from typing import Any

_FUNCTIONS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh", "tanh",
              "log", "exp", "pi", "oo", "Abs"}
_LATEX_WORDS = {"\\cdot": "*", "\\times": "*", "\\div": "/", "\\pi": " pi ", "\\infty": " oo ", "\\ln": " log ",
                "\\log": " log ", "\\exp": " exp ", "\\sin": " sin ", "\\cos": " cos ", "\\tan": " tan ",
                "\\cot": " cot ", "\\sec": " sec ", "\\csc": " csc ", "\\arcsin": " asin ", "\\arccos": " acos ",
                "\\arctan": " atan "}
_ALLOWED = re.compile(r"[0-9A-Za-z+\-*/^().,= ]*")  # no "_", quotes or "<": nothing eval could abuse
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


class NotMath(ValueError):
    """The string is not something this parser turns into a sympy expression."""


def _group(s: str, i: int) -> tuple[str, int]:
    """The argument of a LaTeX command at s[i]: a {braced group} (matched) or one character / \\command."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise NotMath("missing argument")
    if s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1 : j], j + 1
        raise NotMath("unbalanced braces")
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(), i + len(m.group())
    return s[i], i + 1


def latex_to_expr(s: str) -> str:
    """LaTeX-ish math to sympy syntax: `\\frac{a}{b}`, `\\frac12`, `\\sqrt{x}`, `\\sqrt[n]{x}`, `^`, `\\cdot`,
    `\\left(`, `\\pi`, ... Raises NotMath for anything outside the whitelist (no underscores, quotes, brackets)."""
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(200):  # innermost-first would also do; each pass rewrites the first \frac or \sqrt
        m = re.search(r"\\(frac|sqrt)(?![A-Za-z])", s)
        if not m:
            break
        i = m.end()
        if m.group(1) == "frac":
            num, i = _group(s, i)
            den, i = _group(s, i)
            s = f"{s[:m.start()]}(({num})/({den})){s[i:]}"
        else:
            index = None
            if i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close < 0:
                    raise NotMath("unclosed \\sqrt[")
                index, i = s[i + 1 : close], close + 1
            arg, i = _group(s, i)
            root = f"(({arg})**(1/({index})))" if index else f"sqrt({arg})"
            s = f"{s[:m.start()]}{root}{s[i:]}"
    else:
        raise NotMath("too deeply nested")
    s = re.sub(r"\\[A-Za-z]+", lambda m: _LATEX_WORDS.get(m.group(), m.group()), s)
    s = s.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")")
    if "\\" in s or not _ALLOWED.fullmatch(s):
        raise NotMath(f"unsupported characters in {s[:80]!r}")
    if re.search(r"\.(?!\d)", s):  # a "." is a decimal point or nothing: no attribute access
        raise NotMath(f"'.' outside a number in {s[:80]!r}")
    # multi-letter words that are not known functions are products of single-letter symbols ("xy" = x*y)
    return re.sub(r"[A-Za-z]+", lambda m: m.group() if m.group() in _FUNCTIONS else " ".join(m.group()), s)


_PARSER: dict[str, Any] = {}


def to_sympy(text: str) -> Any:
    """A sympy expression from whitelisted LaTeX-ish text (implicit multiplication, `^` as power, e and i as
    Euler's number and the imaginary unit, every other letter a plain symbol)."""
    import string

    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    if not _PARSER:
        namespace: dict[str, Any] = {}
        exec("from sympy import *", namespace)  # noqa: S102 - constant import, the names parse_expr's output uses
        namespace["__builtins__"] = {}
        local = {c: sympy.Symbol(c) for c in string.ascii_letters}
        local.update(e=sympy.E, i=sympy.I, pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, log=sympy.log, exp=sympy.exp,
                     Abs=sympy.Abs)
        _PARSER.update(globals=namespace, locals=local,
                       transformations=standard_transformations + (implicit_multiplication_application, convert_xor))
    expr = latex_to_expr(text)
    if not expr.strip():
        raise NotMath("empty")
    try:
        return parse_expr(expr, local_dict=dict(_PARSER["locals"]), global_dict=_PARSER["globals"],
                          transformations=_PARSER["transformations"])
    except (SyntaxError, TypeError, ValueError, AttributeError, NameError, TokenError) as exc:
        raise NotMath(str(exc)) from exc


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses/brackets/braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _strip_outer(s: str) -> str:
    s = s.strip()
    for left, right in (("(", ")"), ("[", "]"), ("\\{", "\\}"), ("{", "}")):
        if s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def exprs_equal(a: Any, b: Any) -> bool:
    """Symbolic equality: structurally equal, or a - b simplifies to 0, or (constants) agrees numerically."""
    import sympy

    if a == b:
        return True
    diff = a - b
    if sympy.simplify(diff) == 0 or sympy.expand(diff) == 0:
        return True
    if not (a.free_symbols or b.free_symbols):  # constants simplify could not cancel: compare numerically
        value = complex(sympy.N(diff, 30))
        return abs(value) <= 1e-9 * max(1.0, abs(complex(sympy.N(b, 30))))
    return False


def sympy_equal(pred: str, gold: str) -> bool:
    """pred == gold as math: single expressions, equations (`y = 2x` by their lhs - rhs, up to sign), and
    comma-separated tuples/sets (same elements, any order). Raises NotMath when either side does not parse."""
    pred, gold = (re.sub(r"\\(?:left|right)(?![A-Za-z])", "", x).strip() for x in (pred, gold))
    pred, gold = (x.replace(",", "") if _THOUSANDS.fullmatch(x) else x for x in (pred, gold))
    pred_items, gold_items = _split_top(_strip_outer(pred), ","), _split_top(_strip_outer(gold), ",")
    if len(pred_items) != len(gold_items):
        return False
    if len(gold_items) > 1:
        remaining = [to_sympy(g) for g in gold_items]
        for p in pred_items:
            pe = to_sympy(p)
            hit = next((k for k, g in enumerate(remaining) if exprs_equal(pe, g)), None)
            if hit is None:
                return False
            remaining.pop(hit)
        return True
    p_sides, g_sides = _split_top(pred, "="), _split_top(gold, "=")
    if len(p_sides) != len(g_sides) or len(p_sides) > 2:
        return False
    if len(p_sides) == 2:
        dp = to_sympy(p_sides[0]) - to_sympy(p_sides[1])
        dg = to_sympy(g_sides[0]) - to_sympy(g_sides[1])
        return exprs_equal(dp, dg) or exprs_equal(dp, -dg)
    return exprs_equal(to_sympy(pred), to_sympy(gold))


def math_verify_equal(mv: Any, pred: str, gold: str) -> bool:
    """math-verify's verdict (gold first: it is not symmetric); False when it cannot parse either side."""
    gold_parsed = mv.parse(f"${gold}$") or mv.parse(gold)
    pred_parsed = mv.parse(f"${pred}$") or mv.parse(pred)
    return bool(gold_parsed and pred_parsed and mv.verify(gold_parsed, pred_parsed))


def check(pred: str, gold: str, mv: Any = None) -> bool | None:
    """True/False, or None when neither math-verify nor our parser can read both sides."""
    if mv is not None:
        try:
            if math_verify_equal(mv, pred, gold):
                return True
        except Exception:  # noqa: BLE001 - fall back to our own parser
            pass
    try:
        return sympy_equal(pred, gold)
    except NotMath:
        return None


def _limit_memory(max_bytes: int = 4 << 30) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > max_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (max_bytes, hard))
    except (ImportError, ValueError, OSError):
        pass


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # anything sympy or math-verify prints must not corrupt the protocol
    _limit_memory()
    import sympy  # noqa: F401 - import before "ready" so start-up time is not charged to the first request

    try:
        import math_verify as mv
    except Exception:  # noqa: BLE001 - optional dependency; any import failure means "not available"
        mv = None
    check("x + 1", "1 + x")  # warm the parser and simplify (the first simplify call is the slowest)
    out.write(json.dumps({"ready": True, "math_verify": mv is not None}) + "\n")
    out.flush()
    for line in sys.stdin:
        req: dict[str, Any] = {}
        try:
            req = json.loads(line)
            use_mv = mv if req.get("math_verify", True) else None
            verdict, error = check(str(req["pred"]), str(req["gold"]), use_mv), None
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            verdict, error = None, f"{type(exc).__name__}: {exc}"[:500]
        out.write(json.dumps({"id": req.get("id"), "equal": verdict, "error": error}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
