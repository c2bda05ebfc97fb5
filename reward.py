"""
Outcome reward for GRPO (DeepScaleR): 1.0 if the model's final answer is the ground truth, else 0.0.

The reward is the only signal GRPO learns from, so a wrong 0 teaches the model that a right answer is
wrong. Grading runs in layers, cheapest first:
  1. extract_answer: the last \\boxed{..} / \\fbox{..} after the last </think>, braces matched.
  2. normalise + structure: LaTeX noise stripped; answers split into sets, tuples, intervals,
     matrices and equations.
  3. evaluator: numbers, letters, \\frac, \\sqrt, \\pi, + - * / ^ evaluated here (exact Fractions while
     rational, else 80-digit Decimals; letters at 3 fixed random integer points); a tolerance only
     against golds written as decimals, which are measurements. Most answers end here.
  4. sympy: the rest (\\sin, e^x, i, n!, ...) is parsed with parse_latex behind size guards and compared
     numerically: at 50 digits when constant, at random points when symbolic.
grader.py's Grader (also reachable as reward.Grader) runs layer 4 in worker processes under a hard
per-answer timeout, enforced by killing the worker: a signal cannot interrupt sympy stuck in C-level
big-integer arithmetic. This module imports no torch and no sympy at import time (sympy loads on first
use), so workers stay light.
"""
import decimal
import functools
import math
import operator
import random
import re
from decimal import Decimal
from fractions import Fraction

MAX_BOX = 4000     # a \boxed{} longer than this is not an answer (and scanning it costs time)
MAX_ANSWER = 1000  # normalised answers longer than this are refused
MAX_SYMPY = 300    # ... and sympy only sees strings up to this length
MAX_DIGITS = 5000  # refuse to evaluate a power or factorial with more digits than this
GOLD_TOL = Fraction(1, 10**4)  # relative tolerance against a gold written as a decimal
_GUARD = True      # size guards before sympy (workers can turn it off to prove the timeout path)

# ----------------------------------------------------------------------------------------------
# 1. extraction


def extract_answer(text, require_think=True):
    """Content of the last \\boxed{...}/\\fbox{...} after the last </think>; None when absent.
    R1-style chat templates end the prompt with <think>, so only </think> is looked for."""
    if not isinstance(text, str):
        return None
    if require_think:
        cut = text.rfind("</think>")
        if cut < 0:
            return None
        text = text[cut + len("</think>"):]
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": TeX takes the next token
        m = re.match(r"[^\s$]+", text[i:i + 100])
        return m.group(0) if m else None
    depth = 0
    window = text[i:i + MAX_BOX]
    for m in re.finditer(r"\\.|[{}]", window, re.S):  # \{ and \} are literal braces, not groups
        tok = m.group(0)
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                answer = window[1:m.start()].strip()
                return answer or None
    return None  # unterminated (a truncated response) or absurdly long: no answer

# ----------------------------------------------------------------------------------------------
# 2. normalisation


_UNICODE = {"π": "\\pi ", "√": "\\sqrt ", "−": "-", "–": "-", "×": "\\times ", "·": "\\cdot ",
            "∞": "\\infty ", "≤": "\\leq ", "≥": "\\geq ", "≠": "\\neq ", "°": "^\\circ ",
            "∪": "\\cup ", "±": "\\pm ", "\u00a0": " ", "\u2009": " "}
_UNICODE = {ord(k): v for k, v in _UNICODE.items()}
_SUBS = [  # (pattern, replacement), in order
    (r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\.?", ""),
    (r"\\(?:displaystyle|textstyle|quad|qquad)(?![a-zA-Z])", " "),
    (r"(?<!\\)\\[!,;: ]", " "),                        # thin spaces (not the \\ row break)
    (r"~", " "),
    (r"\\[dtc]frac", r"\\frac"),
    (r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)\s*(?:C|F)?(?![a-zA-Z])", ""),
    (r"\\%", "%"), (r"\\\$", ""), (r"\$", ""),
    (r"\\(?:geqslant|geq|ge)(?![a-zA-Z])", r"\\geq "), (r">=", r"\\geq "),
    (r"\\(?:leqslant|leq|le)(?![a-zA-Z])", r"\\leq "), (r"<=", r"\\leq "),
    (r"\\(?:neq|ne)(?![a-zA-Z])", r"\\neq "), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\lbrace", r"\\{"), (r"\\rbrace", r"\\}"), (r"\{,\}", ""),
    (r"\\mathbb\{R\}", r"(-\\infty,\\infty)"),
]
_SUBS = [(re.compile(p), r) for p, r in _SUBS]
_TEXT = re.compile(r"\\(text|textrm|mbox|mathrm|textbf|textit|mathbf|mathit|boldsymbol|operatorname)"
                   r"\s*\{([^{}]*)\}(\^\{?-?\d+\}?)?")
_UNITS = ("units|unit|cm|mm|km|meters|meter|metres|inches|inch|feet|foot|ft|yards|miles|mph|sq|square"
          "|cubic|degrees|degree|cents|cent|dollars|dollars|hours|hour|minutes|minute|seconds|second"
          "|sec|kg|Hz|eV|years|yr|days|day|ways|people|students|points")
_BARE_UNIT = re.compile(r"(?<=[\d}\s])\s*(?:%s)(?:\^\{?-?\d+\}?)?\s*$" % _UNITS)


def _strip_text(s):
    """\\text{ and } -> comma; \\text{ cm} after a number is a unit (dropped); else unwrap."""
    s = _TEXT.sub(lambda m: "," if m.group(2).strip() in ("and", "or", ",") else m.group(0), s)
    units = _TEXT.sub(lambda m: "" if m.group(1) in ("text", "textrm", "mbox", "mathrm") else m.group(0), s)
    if units != s and re.search(r"\d", units):
        s = units
    for _ in range(3):  # nested wrappers
        s = _TEXT.sub(lambda m: m.group(2) + (m.group(3) or ""), s)
    for _ in range(3):
        t = _BARE_UNIT.sub("", s)
        if t == s or not re.search(r"\d", t):
            break
        s = t
    return s


def _unwrap_boxed(s):
    while True:
        m = re.search(r"\\(?:boxed|fbox)\s*\{", s)
        if not m:
            return s
        depth, j = 1, m.end()
        while j < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            j += 1
        if depth:
            return s
        s = s[:m.start()] + s[m.end():j - 1] + s[j:]


def _norm(s):
    """Canonical LaTeX string: no spacing, no \\left, no $, \\frac12 -> \\frac{1}{2}, ..."""
    if not isinstance(s, str):
        return ""
    s = s.strip()
    if len(s) > MAX_ANSWER:
        return ""
    s = _unwrap_boxed(s.translate(_UNICODE))
    for pat, rep in _SUBS:
        s = pat.sub(rep, s)
    s = _strip_text(s)
    s = re.sub(r"(\\[a-zA-Z]+) +(?=[a-zA-Z])", "\\1\x00", s)  # keep "\pi r" apart from "\pir"
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    cmd = r"(\\[a-zA-Z]+|[^{\\\[ ])"
    s = re.sub(r"\\sqrt ?(\\(?!frac)[a-zA-Z]+|[^{\\\[ ])", r"\\sqrt{\1}", s)                   # \sqrt3
    s = re.sub(r"\\frac ?" + cmd + " ?" + cmd, r"\\frac{\1}{\2}", s)   # \frac12
    s = re.sub(r"\\frac ?(\{[^{}]*\}) ?" + cmd, r"\\frac\1{\2}", s)  # \frac{9}7
    s = re.sub(r"\\frac ?" + cmd + r" ?\{", r"\\frac{\1}{", s)        # \frac9{19}
    s = re.sub(r"(\d)_\{(\d+)\}", r"\1_\2", s)                         # 52_{8} -> 52_8
    s = s.rstrip(".").strip(",")
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)                           # multiple choice (C) -> C
    return m.group(1).upper() if m else s

# ----------------------------------------------------------------------------------------------
# structure: ('elem', s) | ('set', [nodes]) unordered | ('seq', brackets, [nodes]) | ('mat', rows)


def _split_top(s, sep):
    """Split s at occurrences of sep outside any bracket; ( and [ both open, ) and ] both close
    (intervals mix them); \\{ \\} are set braces; other \\commands are skipped whole."""
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    while i < n:
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i = start = i + len(sep)
            continue
        c = s[i]
        if c == "\\":
            nxt = s[i + 1:i + 2]
            if nxt in ("{", "}"):
                depth = depth + 1 if nxt == "{" else max(0, depth - 1)
            j = i + 1
            while j < n and s[j].isalpha():
                j += 1
            i = max(j, i + 2)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        i += 1
    parts.append(s[start:])
    return parts


def _group_end(s):
    """End of the bracket group that opens s (s[0] is an opener); -1 when it never closes."""
    depth = 0
    for m in re.finditer(r"\\[{}]|\\[a-zA-Z]+|\\.|[()\[\]{}]", s):
        tok = m.group(0)
        if tok in ("(", "[", "{", "\\{"):
            depth += 1
        elif tok in (")", "]", "}", "\\}"):
            depth -= 1
            if depth == 0:
                return m.end()
    return -1


_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^}]*\})?(.*)\\end\{\1\}", re.S)


def _struct(s, depth=0):
    if depth > 6 or not s:
        return ("elem", s)
    if s.startswith("\\{") and _group_end(s) == len(s):
        return _set([_struct(p, depth + 1) for p in _split_top(s[2:-2], ",")])
    for sep in ("\\cup", ","):  # a union is an unordered collection of its pieces
        parts = _split_top(s, sep)
        if len(parts) > 1:
            return _set([_struct(p, depth + 1) for p in parts if p])
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r]
        return ("mat", [[("elem", c) for c in r.split("&")] for r in rows])
    if s[0] in "([" and s[-1] in ")]" and _group_end(s) == len(s):
        inner = _split_top(s[1:-1], ",")
        if len(inner) >= 2:
            return ("seq", s[0] + s[-1], [_struct(p, depth + 1) for p in inner])
        if s[0] == "(" and s[-1] == ")":
            return _struct(s[1:-1], depth + 1)
    for pm in ("\\pm", "\\mp"):
        if s.count(pm) == 1:
            return ("set", [("elem", s.replace(pm, "+")), ("elem", s.replace(pm, "-"))])
    return ("elem", s)


def _set(nodes):
    """Flatten nested collections: {1\\pm\\sqrt5, -2} is the three solutions."""
    return ("set", [x for n in nodes for x in (n[1] if n[0] == "set" else [n])])


def _is_label(s):
    """Left side that names the answer: x, f(x), (p,q), m_{\\max}, \\angle BEA_1 -- not x+y."""
    return (0 < len(s) <= 24 and not s[0].isdigit() and re.search(r"[a-zA-Z]", s) is not None
            and not re.search(r"[-+*/^=<>]|\\frac|\\sqrt|\\cdot|\\times", s))


def _is_var(s):
    return re.fullmatch(r"[a-zA-Z](_\{?\w+\}?)?|\\(?!pi$|infty$)[a-z]+", s) is not None


_REL = re.compile(r"(\\leq|\\geq|<|>)")


def _ineq_interval(s):
    """x > 2 -> (2,\\infty); 1 \\leq x < 3 -> [1,3); else None."""
    t = [p.strip() for p in _REL.split(s)]
    if len(t) == 3:
        a, op, b = t
        if _is_var(b) and not _is_var(a):
            a, b, op = b, a, {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq"}[op]
        if not _is_var(a) or not b:
            return None
        form = {"<": "(-\\infty,{})", "\\leq": "(-\\infty,{}]", ">": "({},\\infty)", "\\geq": "[{},\\infty)"}
        return form[op].format(b)
    if len(t) == 5 and _is_var(t[2]) and t[0] and t[4]:
        a, op1, _, op2, c = t
        lo, hi, rev = {"<": "(", "\\leq": "["}, {"<": ")", "\\leq": "]"}, {">": "<", "\\geq": "\\leq"}
        if op1 in lo and op2 in lo:
            return lo[op1] + a + "," + c + hi[op2]
        if op1 in rev and op2 in rev:
            return lo[rev[op2]] + c + "," + a + hi[rev[op1]]
    return None


def _alternatives(s):
    """Readings of a whole answer: itself, without its label, an inequality as an interval,
    a thousands-separated number."""
    alts = [s]
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        alts.insert(0, s.replace(",", ""))
    parts = _split_top(s, "=")
    if len(parts) == 2 and _is_label(parts[0]) and parts[1]:
        alts.append(parts[1])
    m = re.fullmatch(r"[a-zA-Z]\\in(.+)", s)
    if m:
        alts.append(m.group(1))
    iv = _ineq_interval(s)
    if iv:
        alts.append(iv)
    return alts

# ----------------------------------------------------------------------------------------------
# comparison; results are tri-state: True, False, or None = "needs sympy" (when sympy is not allowed)


def _all3(results):
    out = True
    for r in results:
        if r is False:
            return False
        if r is None:
            out = None
    return out


def _equiv_norm(p, g, ok):
    if p == g:
        return bool(p)
    if not p or not g:
        return False
    out = False
    for pa in _alternatives(p):
        for ga in _alternatives(g):
            r = True if pa == ga else _cmp(_struct(pa), _struct(ga), ok)
            if r:
                return True
            if r is None:
                out = None
    return out


def _cmp(a, b, ok):
    """a is the prediction, b the gold (the tolerance depends on how the gold is written)."""
    ka, kb = a[0], b[0]
    if ka == kb == "elem":
        return _cmp_elem(a[1], b[1], ok)
    if "set" in (ka, kb):
        A = a[1] if ka == "set" else [a]
        B = b[1] if kb == "set" else [b]
        r = _match(A, B, ok)
        seq, lst = (a, b) if ka == "seq" else (b, a) if kb == "seq" else (None, None)
        if r is not True and seq and seq[1] == "()" and len(seq[2]) == len(lst[1]):  # tuple as a bare list
            pairs = zip(a[2], b[1]) if ka == "seq" else zip(a[1], b[2])
            r2 = _all3(_cmp(x, y, ok) for x, y in pairs)
            r = True if r2 else (None if None in (r, r2) else False)
        return r
    if ka == "mat" and kb == "mat":
        if [len(r) for r in a[1]] != [len(r) for r in b[1]]:
            return False
        return _all3(_cmp(x, y, ok) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
    if "mat" in (ka, kb):  # a column or row vector against a tuple
        a = ("seq", "()", _flat(a[1])) if ka == "mat" else a
        b = ("seq", "()", _flat(b[1])) if kb == "mat" else b
        if a[1] != "()" or b[1] != "()" or not a[2] or not b[2]:
            return False
    if a[0] == b[0] == "seq":
        if a[1] != b[1] or len(a[2]) != len(b[2]):
            return False
        return _all3(_cmp(x, y, ok) for x, y in zip(a[2], b[2]))
    return False


def _flat(rows):
    return [c for r in rows for c in r] if len(rows) == 1 or all(len(r) == 1 for r in rows) else []


def _match(A, B, ok):
    """Unordered comparison (sets, solution lists); duplicates do not count twice."""
    A = list({repr(x): x for x in A}.values())
    B = list({repr(x): x for x in B}.values())
    if len(A) != len(B) or len(A) > 64:
        return False
    used, out = [False] * len(B), True
    for x in A:
        maybe = False
        for j, y in enumerate(B):
            if used[j]:
                continue
            r = _cmp(x, y, ok)
            if r:
                used[j] = True
                break
            maybe = maybe or r is None
        else:
            if not maybe:
                return False
            out = None
    return out


def _cmp_elem(x, y, ok):
    if x == y:
        return True
    if not x or not y:
        return False
    ex, ey = _split_eq(x), _split_eq(y)
    if ex and ey:
        if ex[0] == ey[0] or (_is_label(ex[0]) and _is_label(ey[0])):
            return _cmp_elem(ex[1], ey[1], ok)
        return _sympy_call(_sympy_equation, ex, ey) if ok else None
    if ex or ey:
        if ex and _is_label(ex[0]):
            return _cmp_elem(ex[1], y, ok)
        if ey and _is_label(ey[0]):
            return _cmp_elem(x, ey[1], ok)
        return False
    if _REL.search(x) or _REL.search(y):
        return False  # relations that did not read as intervals compare as strings only
    wx, wy = re.fullmatch(r"[A-Za-z]{4,}", x), re.fullmatch(r"[A-Za-z]{4,}", y)
    if wx and wy:  # word answers: "Evelyn", "east", "ellipse"
        return x.lower() == y.lower()
    nx, ny = _number(x), _number(y)
    if nx and ny and (r := _num_equal(nx, ny)) is not None:
        return r
    if (nx and wy) or (wx and ny):
        return False
    return _sympy_call(_sympy_equal, x, y) if ok else None


def _split_eq(s):
    parts = _split_top(s, "=")
    return parts if len(parts) == 2 and all(parts) else None

# ----------------------------------------------------------------------------------------------
# sympy as the exception: numbers, letters, \frac, \sqrt, \pi, + - * / ^ are evaluated here, exactly
# as Fractions while rational, else as 80-digit Decimals (sympy decides constants numerically
# too). Letters are variables set to the same 3 fixed random integers on both sides: polynomials
# of degree d that differ agree at a random point of [100, 10^4)^n with probability < d/10^4.

_POINTS = [{c: Fraction(random.Random(131 * k + ord(c)).randrange(100, 10**4)) for c in
            "abcdfghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"} for k in range(3)]  # e, i: constants
_TOKEN = re.compile(r"\\[a-zA-Z]+|\d+(?:\.\d*)?|\.\d+|\S")
_DECIMAL = decimal.Context(prec=80)
_PI = _DECIMAL.create_decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899862803")


def _dec(x):
    return x if isinstance(x, Decimal) else Decimal(x.numerator) / x.denominator


def _arith(op, a, b):
    return op(a, b) if type(a) is type(b) else op(_dec(a), _dec(b))  # Fraction and Decimal do not mix


def _sqrt(x):
    if isinstance(x, Fraction) and all(math.isqrt(n) ** 2 == n for n in (x.numerator, x.denominator)):
        return Fraction(math.isqrt(x.numerator), math.isqrt(x.denominator))  # ValueError below 0
    return _arith(lambda a, _: a.sqrt(), x, Decimal(0))


def _pow(base, e, varying):
    if not isinstance(e, Fraction) or e.denominator > 2 or (varying and base <= 0):
        raise ValueError("not for the evaluator")  # (-1)^n is not real off the integers: sympy's
    base, n = (_sqrt(base), int(e * 2)) if e.denominator == 2 else (base, int(e))
    size = math.log10(abs(base.numerator) + base.denominator) if isinstance(base, Fraction) else 1
    if abs(n) * max(size, 1) > MAX_DIGITS:
        raise ValueError("too big")
    return base ** n


def _eval_at(s, point):
    """(value, uses letters) of s with letters from point. ValueError outside this grammar:
    numbers, letters, \\pi, \\frac, \\sqrt, + - * / ^ and implicit products, read as sympy does."""
    toks, seen = _TOKEN.findall(s)[::-1], []

    def take(want=None):
        if not toks or want not in (None, toks[-1]):
            raise ValueError(f"expected {want}")
        return toks.pop()

    def expr(depth):
        if depth > 30:
            raise ValueError("too deep")
        v = term(depth)
        while toks and toks[-1] in ("+", "-"):
            op = operator.add if take() == "+" else operator.sub
            v = _arith(op, v, term(depth))
        return v

    def term(depth):  # implicit products bind tighter than * and /: 1/2x is 1/(2x)
        v = product(depth)
        while toks and toks[-1] in ("*", "/", "\\cdot", "\\times"):
            v = _arith(operator.truediv if take() == "/" else operator.mul, v, product(depth))
        return v

    def product(depth):
        v = factor(depth)
        while toks and (toks[-1][0] in "({." or toks[-1][0].isalnum() or toks[-1] in ("\\pi", "\\frac", "\\sqrt")):
            v = _arith(operator.mul, v, factor(depth))
        return v

    def factor(depth):
        if toks and toks[-1] in ("-", "+"):
            return -factor(depth) if take() == "-" else factor(depth)
        base = atom(depth)
        if not toks or toks[-1] != "^":
            return base
        take()
        n = len(seen)
        e = atom(depth)  # x^23 is x^{23} in sympy
        return _pow(base, e, len(seen) > n)

    def atom(depth):
        t = take()
        if t[0].isdigit() or t[0] == ".":
            return Fraction(t)
        if t in ("(", "{"):
            v = expr(depth + 1)
            take(")" if t == "(" else "}")
            return v
        if t in ("\\frac", "\\sqrt"):  # _norm braced their arguments
            args = [(take("{"), expr(depth + 1), take("}"))[1] for _ in range(2 if t == "\\frac" else 1)]
            return _sqrt(args[0]) if t == "\\sqrt" else _arith(operator.truediv, *args)
        if t == "\\pi":
            return _PI
        if t not in point:
            raise ValueError(f"not for the evaluator: {t}")
        seen.append(t)
        return point[t]

    with decimal.localcontext(_DECIMAL):
        v = expr(0)
    if toks:
        raise ValueError("trailing input")
    return v, bool(seen)


@functools.lru_cache(maxsize=1 << 16)  # golds repeat 16x in a group
def _number(s):
    """(values at the 3 points -- one value without letters, inexact, percent) or None.
    inexact: written as a decimal or in scientific notation, i.e. a measurement."""
    pct = s.endswith("%")
    s = s[:-1] if pct else s
    inexact = "." in s or re.search(r"(\\times|\\cdot|\*)10\^|\d[eE][+-]?\d", s) is not None
    if m := re.fullmatch(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s):  # mixed number 1\frac{4}{5}
        if not 0 < int(m.group(3)) < int(m.group(4)):
            return None
        s = "{}({}+\\frac{{{}}}{{{}}})".format(*m.groups())
    s = re.sub(r"^([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d+)$", r"\1\\cdot10^{\2}", s)  # 6.7e-5
    s = re.sub(r"^(\d+)_\d+$", r"\1", s)  # 52_8: compare the digits, base aside
    try:
        vals = []
        for point in _POINTS:
            v, varies = _eval_at(s, point)
            vals.append(v)
            if not varies:
                break
        return tuple(vals), inexact, pct
    except (ValueError, ArithmeticError, RecursionError):  # DivisionByZero, Overflow are Arithmetic
        return None


def _num_equal(p, g):
    """Exact for rationals; relative tolerance only when the gold is inexact; x% also reads x/100.
    None when the Decimals are too close to decide (sympy decides)."""
    out, n = False, max(len(p[0]), len(g[0]))
    for ps in [p[0]] + [tuple(_arith(operator.truediv, v, Fraction(100)) for v in p[0])] * p[2]:
        for gs in [g[0]] + [tuple(_arith(operator.truediv, v, Fraction(100)) for v in g[0])] * g[2]:
            r = _all3(_value_equal(a, b, g[1]) for a, b in zip(ps * (n // len(ps)), gs * (n // len(gs))))
            if r:
                return True
            out = None if r is None else out
    return out


def _value_equal(a, b, tol):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or (tol and b != 0 and abs(a - b) <= GOLD_TOL * abs(b))
    with decimal.localcontext(_DECIMAL):
        a, b = _dec(a), _dec(b)
        diff, scale = abs(a - b), max(abs(a), abs(b))
        rel = diff / scale if scale else Decimal(0)
    if tol:
        return None if abs(rel - Decimal("1e-4")) < Decimal("1e-20") else rel <= Decimal("1e-4")
    return True if rel < Decimal("1e-30") else False if rel > Decimal("1e-20") else None

# ----------------------------------------------------------------------------------------------
# 3. sympy (loaded lazily: most answers never need it)


_sp = None


def _load_sympy():
    global _sp
    if _sp is None:
        import sympy
        from sympy.parsing.latex import parse_latex
        sympy.parse_latex_ = parse_latex
        _sp = sympy
    return _sp


def _sympy_call(fn, *args):
    try:
        return bool(fn(*args))
    except Exception:  # parse errors, RecursionError, MemoryError, ...: not equal
        return False


def _too_big(e, depth=0):
    """Would evaluating e build a giant number? Checked bottom-up before anything evaluates."""
    sp = _sp
    if depth > 60 or any(_too_big(a, depth + 1) for a in e.args):
        return True
    if isinstance(e, (sp.Integral, sp.Sum, sp.Product, sp.Limit, sp.Derivative)):
        return True
    if isinstance(e, sp.Pow) and e.exp.is_number:
        x = abs(complex(e.exp.evalf(15)))
        if e.base.is_number:
            b = abs(complex(e.base.evalf(15)))
            return not math.isfinite(x) or (b > 0 and x * abs(math.log10(b)) > MAX_DIGITS)
        return x > 10**4
    if isinstance(e, (sp.factorial, sp.factorial2, sp.binomial, sp.gamma)):
        return any(a.is_number and abs(complex(a.evalf(15))) > 2000 for a in e.args)
    return False


@functools.lru_cache(maxsize=4096)  # golds repeat across a group; sympy trees are immutable
def _to_sympy(s):
    if len(s) > MAX_SYMPY or "%" in s or s.count("{") > 60:
        raise ValueError("not for sympy")
    sp = _load_sympy()
    s = re.sub(r"(?<![\\a-zA-Z])([a-zA-Z])\(", r"\1\\cdot(", s)  # n(n+1) is a product, not a call
    e = sp.parse_latex_(s)
    if _GUARD and _too_big(e):
        raise ValueError("too big")
    consts = {sp.Symbol("pi"): sp.pi, sp.Symbol("e"): sp.E, sp.Symbol("i"): sp.I}
    e = e.xreplace(consts)
    if not e.atoms(sp.Integral, sp.Sum, sp.Product, sp.Limit, sp.Derivative):
        e = e.doit()
    return e


def _close(va, vb, tol):
    sp = _sp
    if not (va.is_number and vb.is_number) or any(v.has(sp.nan, sp.zoo, sp.oo, -sp.oo) for v in (va, vb)):
        return None
    diff, scale = abs(va - vb), max(abs(va), abs(vb))
    return bool(diff <= tol * scale or diff < 1e-40)


def _points(free, n=6, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        yield {s: _sp.Float(rng.uniform(0.3, 2.7), 30) for s in free}


def _sympy_equal(x, y):
    sp = _load_sympy()
    a, b = _to_sympy(x), _to_sympy(y)
    if a == b:
        return True
    tol = 1e-4 if b.has(sp.Float) else 1e-30  # tolerance only against decimal golds
    free = a.free_symbols | b.free_symbols
    if not free:
        d = a - b
        if d.is_Rational and tol < 1e-4:  # exact: 1/2^99 is not 1/2^98
            return d == 0
        r = _close(a.evalf(50), b.evalf(50), tol)
        return r if r is not None else sp.simplify(d) == 0
    agree, tol = 0, max(tol, 1e-12)
    for pt in _points(free):  # symbolic: agree at random points <=> same function (w.h.p.)
        r = _close(a.evalf(30, subs=pt), b.evalf(30, subs=pt), tol)
        if r is False:
            return False
        agree += r is True
        if agree >= 3:
            return True
    return sp.simplify(a - b) == 0


def _sympy_equation(ex, ey):
    """l1 = r1 and l2 = r2 are the same equation if l1 - r1 is a nonzero constant times l2 - r2."""
    a = _to_sympy(ex[0]) - _to_sympy(ex[1])
    b = _to_sympy(ey[0]) - _to_sympy(ey[1])
    free = a.free_symbols | b.free_symbols
    ratios = []
    for pt in _points(free):
        va, vb = a.evalf(30, subs=pt), b.evalf(30, subs=pt)
        if va.is_number and vb.is_number and abs(vb) > 1e-12 and abs(va) > 1e-12:
            ratios.append(va / vb)
    return len(ratios) >= 3 and all(_close(r, ratios[0], 1e-12) for r in ratios)

# ----------------------------------------------------------------------------------------------
# public API


def _gold_strings(gold):
    """Golds as stored: "025", 142.0, ["$\\frac{1}{2}$", "0.5\\n"] -> list of strings."""
    out = []
    for g in gold if isinstance(gold, (list, tuple)) else [gold]:
        if isinstance(g, bool) or g is None:
            continue
        if isinstance(g, float):
            g = str(int(g)) if g.is_integer() else repr(g)
        out.append(g if isinstance(g, str) else str(g))
    return out


def _equiv(pred, gold, ok):
    try:
        return _equiv_norm(_norm(pred), _norm(gold), ok)
    except Exception:  # RecursionError on absurd input, ...: never raise into a training loop
        return False


def is_equiv(pred, gold):
    """Are two answer strings the same mathematical answer? (gold decides the numeric tolerance)"""
    return _equiv(pred, gold, True) is True


def reward(response, gold, require_think=True):
    """1.0 if the extracted answer matches any acceptable gold, else 0.0."""
    pred = extract_answer(response, require_think)
    if pred is None:
        return 0.0
    return float(any(is_equiv(pred, g) for g in _gold_strings(gold)))


def __getattr__(name):
    """The batch grader (a pool of worker processes) lives in grader.py; reward.Grader is it."""
    if name in ("Grader", "grade_file"):
        import grader
        return getattr(grader, name)
    raise AttributeError(f"module 'reward' has no attribute {name!r}")


if __name__ == "__main__":  # python reward.py FILE.jsonl [--no-think] [--timeout S] [--workers N]
    import grader
    grader.main()
