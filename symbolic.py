"""
The sympy layer of grader.py: answers the exact evaluator cannot read (trig, logs, i, n!, ...) are parsed
with sympy's parse_latex behind size guards and compared numerically -- at 50 digits when constant, at
random points when symbolic -- with simplify() as the last resort. Only reward.Grader's worker processes
call it: sympy can spend unbounded time in C-level big-integer code that no signal interrupts, so the
bound is a worker that is killed. parser_problem() lets the parent refuse to start without sympy's parser.
"""
import functools
import importlib.metadata
import math
import random
import re

MAX_SYMPY = 300    # sympy only sees strings up to this length
MAX_DIGITS = 5000  # refuse to build a power or factorial with more digits than this
ANTLR = "antlr4-python3-runtime"
ANTLR_VERSION = "4.11"  # the only runtime sympy's LaTeX parser accepts
GUARD = True       # size guards before evaluation (tests turn them off to prove the worker timeout)

_sp = None


def parser_problem():
    """None when sympy's LaTeX parser can load (checked by version, without importing sympy); else what to
    install. Without it every answer that needs sympy would silently score 0."""
    try:
        importlib.metadata.version("sympy")
        found = importlib.metadata.version(ANTLR)
    except importlib.metadata.PackageNotFoundError as e:
        found = f"{e.name or ANTLR} is not installed"
    else:
        if found.split(".")[:2] == ANTLR_VERSION.split("."):
            return None
        found = f"{ANTLR} {found} is installed"
    return (f"sympy's LaTeX parser needs {ANTLR} {ANTLR_VERSION}: {found}. Install it with "
            f"pip install '{ANTLR}=={ANTLR_VERSION}.*' (sympy also needed)")


def load():
    global _sp
    if _sp is None:
        import sympy
        from sympy.parsing.latex import parse_latex
        sympy.parse_latex_ = parse_latex
        _sp = sympy
    return _sp


def compare(kind, x, y, abs_tol=None):
    """kind 'equal': are expressions x and y equal (within abs_tol when given: x is a long decimal);
    'relation': are relations x and y ((lhs, op, rhs)) the same. False on any parse error."""
    try:
        return bool(_equal(x, y, abs_tol) if kind == "equal" else _relation(x, y))
    except Exception:  # parse errors, RecursionError, MemoryError, ...: not equal
        return False


def _too_big(e, depth=0):
    """Would evaluating e build a giant number? Checked bottom-up before anything evaluates."""
    sp = _sp
    if depth > 60 or any(_too_big(a, depth + 1) for a in e.args):
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
    sp = load()
    s = re.sub(r"(?<![\\a-zA-Z])([a-zA-Z])\(", r"\1\\cdot(", s)  # n(n+1) is a product, not a call
    e = sp.parse_latex_(s, strict=True)  # not strict, the parser drops what it cannot read: x \in [-2,7]+1 -> x
    if GUARD and _too_big(e):
        raise ValueError("too big")
    e = e.xreplace({sp.Symbol("pi"): sp.pi, sp.Symbol("e"): sp.E, sp.Symbol("i"): sp.I})
    if not e.atoms(*[getattr(sp, k) for k in _UNEVALUATED]):
        e = e.doit()
    return e


def _undefined(v):
    return v.has(_sp.nan, _sp.zoo)  # 1/0, 0/0, a clock time read as 5/0: never equal to anything


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


_UNEVALUATED = ("Integral", "Sum", "Product", "Limit", "Derivative")


def _equal(x, y, abs_tol=None):
    sp = load()
    a, b = _to_sympy(x), _to_sympy(y)
    if _undefined(a) or _undefined(b):
        return False
    if a == b:
        return True
    if a.atoms(*[getattr(sp, k) for k in _UNEVALUATED]) or b.atoms(*[getattr(sp, k) for k in _UNEVALUATED]):
        return False  # sums, integrals, limits: compared as written (up to sympy's ordering), never evaluated
    tol = 1e-4 if b.has(sp.Float) else 1e-30  # tolerance only against decimal golds
    free = a.free_symbols | b.free_symbols
    if not free:
        d = a - b
        if abs_tol is not None:  # a decimal of 10+ digits stands for the value it rounds
            return abs(d.evalf(50)) <= abs_tol
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


_FLIP = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq", "=": "=", "\\neq": "\\neq"}


def _relation(rx, ry):
    """l1 op1 r1 and l2 op2 r2 are the same relation if l1 - r1 = k (l2 - r2) for a constant k != 0, with
    op2 = op1 (k > 0) or op1 flipped (k < 0; for = and \\neq any k)."""
    a = _to_sympy(rx[0]) - _to_sympy(rx[2])
    b = _to_sympy(ry[0]) - _to_sympy(ry[2])
    free = a.free_symbols | b.free_symbols
    ratios = []
    for pt in _points(free):
        va, vb = a.evalf(30, subs=pt), b.evalf(30, subs=pt)
        if not (va.is_number and vb.is_number) or va.has(_sp.zoo, _sp.nan) or vb.has(_sp.zoo, _sp.nan):
            continue
        if abs(vb) > 1e-12 and abs(va) > 1e-12:
            ratios.append(va / vb)
    if len(ratios) < 3 or not all(_close(r, ratios[0], 1e-12) for r in ratios):
        return False
    k = complex(ratios[0])
    if abs(k.imag) > 1e-12:
        return False
    if "=" in (rx[1], ry[1]) or "\\neq" in (rx[1], ry[1]):
        return rx[1] == ry[1]
    return rx[1] == (ry[1] if k.real > 0 else _FLIP[ry[1]])
