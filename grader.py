"""
Is a model's final answer the same mathematical answer as the gold? The comparison, in layers, cheapest
first (the rules themselves are written down in reward.py's docstring):
  1. normalize: LaTeX noise, words and units around a value, number forms -> one canonical string.
  2. structure: sets, tuples, intervals, matrices, relations, \\pm.
  3. evaluator: numbers, letters, \\frac, \\sqrt, \\pi, + - * / ^ evaluated here, exactly (Fractions while
     rational, else 80-digit Decimals; letters at 3 fixed random integer points), behind size guards.
  4. sympy (symbolic.py): trig, logs, i, n!, ... -- only when equal(..., symbolic=True). reward.py makes
     such calls only in worker processes it can kill: a signal cannot interrupt sympy.
Results are tri-state: True, False, or None = "only sympy can decide". Every layer here is bounded: answers
over MAX_ANSWER characters are refused, powers and running products are size-checked before they are
computed, structures are depth- and size-capped. No torch, no processes, nothing from reward.py.
"""
import collections
import decimal
import functools
import itertools
import math
import operator
import random
import re
from decimal import Decimal
from fractions import Fraction

MAX_ANSWER = 1000   # normalised answers longer than this are refused
MAX_DIGITS = 5000   # refuse to evaluate a power with more digits than this ...
MAX_BITS = 20000    # ... or any exact intermediate value larger than this (a long product of big powers)
GOLD_TOL = Fraction(1, 10**4)  # relative tolerance against a gold written as a decimal (a measurement)
LONG_DECIMAL = 10   # a decimal with this many significant digits stands for the exact value it rounds
DOUBLE_DIGITS = 15  # ... to its 15th digit: a float's repr (7.0710678118654755 for 5\\sqrt2) has noise past it
THOUSANDS = "\x01"  # marks a comma that may be a thousands separator (58,500) until the reading is chosen

# ----------------------------------------------------------------------------------------------
# 1. normalisation


_UNICODE = {"π": "\\pi ", "√": "\\sqrt ", "−": "-", "–": "-", "×": "\\times ", "·": "\\cdot ", "⋅": "\\cdot ",
            "∞": "\\infty ", "≤": "\\leq ", "≥": "\\geq ", "≠": "\\neq ", "°": "^\\circ ", "≈": "\\approx ",
            "∪": "\\cup ", "±": "\\pm ", "∈": "\\in ", "÷": "/", "\u00a0": " ", "\u2009": " ", "\u202f": " "}
_UNICODE = {ord(k): v for k, v in _UNICODE.items()}
_SUBS = [  # (pattern, replacement), in order
    (r"(?<!\\)\\\\(?=[a-zA-Z]{2})", r"\\"),  # \\frac (a doubled backslash, as escaped sources store it) is \frac
    (r"\\(?:boxed|fbox)(?![a-zA-Z])", ""),   # a box inside the answer: its braces group
    (r",\\!\s*(?=\d{3}(?!\d))", THOUSANDS), (r"\{,\}(?=\d{3}(?!\d))", THOUSANDS),  # 10,\!080 and 10{,}080
    (r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\.?", ""),
    (r"\\(?:displaystyle|textstyle|quad|qquad)(?![a-zA-Z])", " "),
    (r"(?<!\\)\\[!,;: ]", " "),                        # thin spaces (not the \\ row break)
    (r"~", " "),
    (r"\\[dtc]frac", r"\\frac"),
    (r"\\operatorname\{(sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|log|ln|exp|lcm|gcd)\}", r"\\\1 "),
    (r"\\%", "%"), (r"\\\$", ""), (r"\$", ""), (r"\\(?:text|mbox|mathrm)\{\s*([AaPp])\.?\s*[Mm]\.?\s*\}", r"\1M"),
    (r"\\(?:geqslant|geq|ge)(?![a-zA-Z])", r"\\geq "), (r">=", r"\\geq "),
    (r"\\(?:leqslant|leq|le)(?![a-zA-Z])", r"\\leq "), (r"<=", r"\\leq "),
    (r"\\(?:neq|ne)(?![a-zA-Z])", r"\\neq "), (r"!=", r"\\neq "), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\lbrace", r"\\{"), (r"\\rbrace", r"\\}"), (r"\{,\}", ""), (r"\\(?:emptyset|varnothing)(?![a-zA-Z])", r"\\{\\}"),
    (r"\\mathbb\{R\}", r"(-\\infty,\\infty)"), (r"(?<!\\)\\\s*$", ""),  # a stray backslash at the end
]
_SUBS = [(re.compile(p), r) for p, r in _SUBS]
_DEG = r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)"
_TRIG = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![a-zA-Z])")
_TEXT = re.compile(r"\\(text|textrm|textnormal|textsf|texttt|textup|mbox|mathrm|mathsf|mathtt|textbf|textit|mathbf|"
                   r"mathit|boldsymbol|operatorname|emph)\s*\{([^{}]*)\}(\^\{?-?\d+\}?)?")
_UNITS = ("cm|mm|km|nm|ft|in|yd|mi|mph|kph|sec|min|hr|hrs|kg|mg|lb|lbs|oz|ml|mL|cc|sq|yr|yrs|Hz|kHz|MHz|GHz|eV|keV|"
          "MeV|kJ|kW|Pa|atm|mol|cal|kcal|deg|rad|pt|pts|AU|pc|ly")  # short units; one-letter ones need a space:
_UNITS1 = "m|h|s|g|L|J|N|W|V|A|K"                                   # 5h may be 5 times h
# after a number: a unit, or words ("square units", "people", "days"; a 4+ letter word needs no space)
_UNIT_TAIL = re.compile(r"(?<=[\d}])(?:\s*[a-zA-Z]{4,}|\s*(?:%s)|\s+(?:%s))(?![a-zA-Z])(?:\s*[a-zA-Z]{2,}(?![a-zA-Z]))*"
                        r"(?:\^\{?-?\d+\}?|/[a-zA-Z]+)?\s*(?=,|$)" % (_UNITS, _UNITS1))


def _degrees(s):
    """Degrees inside a trig function are radians * pi/180; elsewhere (an angle as the answer) dropped."""
    if _TRIG.search(s):
        s = re.sub(r"(\d+(?:\.\d+)?|[a-zA-Z])\s*" + _DEG, r"\\frac{\1\\pi}{180}", s)
    return re.sub(_DEG + r"\s*(?:\\text\{\s*[CF]\s*\}|[CF](?![a-zA-Z]))?", "", s)


def _strip_text(s):
    """\\text{ and } -> comma; a unit after a number is dropped; other \\text{} unwrapped; and/or -> comma."""
    s = _TEXT.sub(lambda m: "," if m.group(2).strip() in ("and", "or", ",") else m.group(0), s)
    units = _TEXT.sub(lambda m: "" if m.group(1) not in ("textbf", "mathbf", "boldsymbol", "textit", "mathit", "emph")
                      and re.fullmatch(r"\s+[a-zA-Z][a-zA-Z. ]*|[a-zA-Z][a-zA-Z. ]+", m.group(2))
                      else m.group(0), s)
    if units != s and re.search(r"\d\s*$|\d\s*,", units):
        s = units
    for _ in range(3):  # nested wrappers
        s = _TEXT.sub(lambda m: m.group(2) + (m.group(3) or ""), s)
    s = re.sub(r"(?<=[\d}\s])\s*(?:percentage|percent|pct)\b", "%", s)
    s = re.sub(r"(?:,\s*)?(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z])\s*", ",", s) if re.search(r"[\d)\]}]", s) else s
    for _ in range(3):
        t = _UNIT_TAIL.sub("", s)
        if t == s or not re.search(r"\d", t):
            break
        s = t
    return s


def _repeating(m):
    """0.1\\overline{6} -> \\frac{15}{90}: a repeating decimal is the fraction it stands for."""
    i, a, r = m.group(1) or "0", m.group(2), m.group(3)
    return f"\\frac{{{int(i + a + r) - int(i + a)}}}{{{'9' * len(r) + '0' * len(a)}}}"


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?\.?")
_CHOICE = re.compile(r"(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(([A-E])\)\s*\}?[^()]*"
                     r"|([A-E])(?:\s+[A-Z][a-z]{2,}|\.\s+.+)")


def normalize(s):
    """Canonical LaTeX string: no spacing, no \\left, no $, no units, \\frac12 -> \\frac{1}{2}, ..."""
    return _normalize(s.strip()) if isinstance(s, str) and len(s.strip()) <= MAX_ANSWER else ""


@functools.lru_cache(maxsize=1 << 16)  # a gold is normalised once per group, not once per answer
def _normalize(s):
    if _PLAIN_NUMBER.fullmatch(s):  # most answers: nothing to clean
        return s.rstrip(".")
    s = s.translate(_UNICODE)
    if m := re.fullmatch(_CHOICE, s):  # "(D) Alina", "\\textbf{(D) } 12", "D. x = 42": multiple choice
        return m.group(1) or m.group(2)
    s = re.sub(r"\s*\.$", "", s)  # a sentence's full stop (5. is 5 anyway)
    for pat, rep in _SUBS:
        s = pat.sub(rep, s)
    s = re.sub(r"(\d*)\.(\d*)\\(?:overline|bar)\{(\d{1,40})\}", _repeating, s)  # 0.\overline{3} is 1/3
    s = _degrees(s)
    s = _strip_text(s)
    s = re.sub(r"(?<![\w.^{}\\])(-?)(\d+)\s+(\d+)\s*/\s*(\d+)(?![\w./])", lambda m: m[0] if not 0 < int(m[3]) < int(m[4])
               else f"{m[1]}({m[2]}+\\frac{{{m[3]}}}{{{m[4]}}})", s)                          # 2 3/4 is 2 + 3/4
    if "^" in s and re.fullmatch(r"\d+(\^\{?\d+\}?)?(\s+\d+(\^\{?\d+\}?)?)+", s):  # 2^2 3 5 17: all factors
        s = re.sub(r"\s+", r"\\cdot ", s)
    s = re.sub(r"(\^\s*\d+)\s+(?=\d)", r"\1\\cdot ", s)                                  # 3^2 5^3: a product
    if re.fullmatch(r"(?:[^,=]+=)?\s*[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?\s*%?\s*", s):  # 58,500 (not (2,251,252))
        s = s.replace(",", THOUSANDS)
    s = re.sub(r"(\\[a-zA-Z]+) +(?=[a-zA-Z])", "\\1\x00", s)  # keep "\pi r" apart from "\pir"
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    cmd = r"(\\[a-zA-Z]+|[^{\\\[ ])"
    s = re.sub(r"\\sqrt ?(\\(?!frac)[a-zA-Z]+|[^{\\\[ ])", r"\\sqrt{\1}", s)   # \sqrt3
    s = re.sub(r"\\frac ?" + cmd + " ?" + cmd, r"\\frac{\1}{\2}", s)          # \frac12
    s = re.sub(r"\\frac ?(\{[^{}]*\}) ?" + cmd, r"\\frac\1{\2}", s)           # \frac{9}7
    s = re.sub(r"\\frac ?" + cmd + r" ?\{", r"\\frac{\1}{", s)                 # \frac9{19}
    s = re.sub(r"(\d)_\{(\d+)\}", r"\1_\2", s)                                 # 52_{8} -> 52_8
    s = s.rstrip(".").strip(",")
    while s.startswith("{") and _group_end(s) == len(s):  # braces do not print: {-5, 5} is the list -5, 5
        s = s[1:-1]
    return m.group(1).upper() if (m := re.fullmatch(r"\(([A-E])\)", s)) else s  # multiple choice (C) -> C

# ----------------------------------------------------------------------------------------------
# 2. structure: ('elem', s) | ('set', [nodes], braced) unordered | ('seq', brackets, [nodes]) | ('mat', rows)


def _split_top(s, sep):
    """Split s at occurrences of sep outside any bracket; ( and [ both open, ) and ] both close
    (intervals mix them); \\{ \\} are set braces; other \\commands are skipped whole."""
    if sep not in s:
        return [s]
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    while i < n:
        if depth == 0 and s.startswith(sep, i) and not (sep[-1].isalpha() and s[i + len(sep):i + len(sep) + 1].isalpha()):
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
        return _set([_struct(p, depth + 1) for p in _split_top(s[2:-2], ",") if p], True)
    parts = _split_top(s, ";")  # ; separates whole solutions: p=5,q=2;p=7,q=2
    if len(parts) > 1:
        nodes = [_struct(p, depth + 1) for p in parts if p]  # each one a tuple if it is a bare list
        return ("set", [("seq", "()", n[1]) if n[0] == "set" and not n[2] else n for n in nodes], False)
    for sep in ("\\cup", ","):  # a union is an unordered collection of its pieces
        parts = _split_top(s, sep)
        if len(parts) > 1:
            return _assignments(parts, depth) or _set([_struct(p, depth + 1) for p in parts if p], False)
    if m := _MATRIX.fullmatch(s[1:-1] if s[:1] in "([" and _group_end(s) == len(s) else s):
        rows = [r for r in m.group(2).split("\\\\") if r]
        return ("mat", [[("elem", c) for c in r.split("&")] for r in rows])
    if s[0] in "([" and s[-1] in ")]" and _group_end(s) == len(s):
        inner = _split_top(s[1:-1], ",")
        if len(inner) == 1 and ";" in s:
            inner = _split_top(s[1:-1], ";")
        if len(inner) >= 2:
            return _tuples(s[0] + s[-1], [_struct(p, depth + 1) for p in inner])
        if s[0] == "(" and s[-1] == ")":
            return _struct(s[1:-1], depth + 1)
    for pm in ("\\pm", "\\mp"):
        if s.count(pm) == 1:
            return ("set", [("elem", s.replace(pm, "+")), ("elem", s.replace(pm, "-"))], False)
    return ("elem", s)


def _assignments(parts, depth):
    """p=5, q=2, p=7, q=2: labels repeating in a cycle are whole solutions (5, 2) and (7, 2)."""
    sides = [_split_top(p, "=") for p in parts]
    labels = [x[0] for x in sides]
    k = len(set(labels))
    if not 2 <= k < len(parts) or len(parts) % k or labels != labels[:k] * (len(parts) // k) or not all(
            len(x) == 2 and x[1] and _is_label(x[0]) for x in sides):
        return None
    values = [_struct(x[1], depth + 1) for x in sides]
    return ("set", [("seq", "()", values[i:i + k]) for i in range(0, len(values), k)], False)


def _tuples(brackets, nodes):
    """(\\pm 3, \\pm 2) is the four pairs; other tuples are themselves."""
    if not any(n[0] == "set" and not n[2] for n in nodes):
        return ("seq", brackets, nodes)
    choices = [n[1] if n[0] == "set" and not n[2] else [n] for n in nodes]
    if math.prod(map(len, choices)) > 16:
        return ("seq", brackets, nodes)
    return ("set", [("seq", brackets, list(c)) for c in itertools.product(*choices)], True)


def _set(nodes, braced):
    """Flatten nested collections: {1\\pm\\sqrt5, -2} is the three solutions."""
    return ("set", [x for n in nodes for x in (n[1] if n[0] == "set" and not n[2] else [n])], braced)


_LABEL = re.compile(r"(?:[a-zA-Z]'?|\\[a-zA-Z]+(?<!\\pi)(?<!\\infty))(?:_\{?[\w\\ ]+\}?)?(?:\([^()]*\))?"  # x, a_n, f(x)
                    r"|(?:m\s*)?\\angle\s*[A-Za-z_{}\d ]+|\|[A-Z]+\||[A-Z]{2,4}|\\frac\{[A-Za-z]+\}\{[A-Za-z]+\}"
                    r"|\((?:[a-zA-Z](?:_\{?\w+\}?)?,)+[a-zA-Z](?:_\{?\w+\}?)?\)|[A-Za-z_{}\d]+:[A-Za-z_{}\d]+"
                    r"|[A-Za-z]+\([A-Za-z ,]+\)|\\overline\{[A-Z]+\}|S_\{?\\triangle ?[A-Z]+\}?|\[[A-Z]{3,}\]")
_FUNCS = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt|frac|arc\w+)(?![a-zA-Z])")


def _is_label(s):
    """A left side that names the answer: x, f(x), a_n, m\\angle ABC, \\frac{AB}{CD}, P(A), |AB|, [ABC] -- not x+y."""
    if not 0 < len(s) <= 30 or re.fullmatch(r"\d.*", s) or (_FUNCS.search(s) and not s.startswith("\\frac{")):
        return False
    return _LABEL.fullmatch(s) is not None


def _is_var(s):
    return re.fullmatch(r"[a-zA-Z](_\{?\w+\}?)?|\\(?!pi$|infty$)[a-z]+", s) is not None or (
        _is_label(s) and "(" in s)


_REL = re.compile(r"(\\leq|\\geq|\\neq|<|>|=)")
_FLIP = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq", "=": "=", "\\neq": "\\neq"}


def _ineq_interval(s):
    """x > 2 -> (2,\\infty); 1 \\leq x < 3 -> [1,3); else None."""
    t = [p.strip() for p in _REL.split(s)]
    if len(t) == 3 and t[1] == "\\neq" and _is_var(t[0]) and t[2] and not _is_var(t[2]):
        return f"(-\\infty,{t[2]})\\cup({t[2]},\\infty)"  # x \\neq 1: the line without a point
    if "=" in t or "\\neq" in t:
        return None
    if len(t) == 3:
        a, op, b = t
        if _is_var(b) and not _is_var(a):
            a, b, op = b, a, _FLIP[op]
        if not _is_var(a) or not b or _is_var(b):
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


def _value_part(s):
    """The answer in a chain: x = 5+5+1 = 11 -> x=11; \\frac{\\pi}{4} \\approx 0.785 -> \\frac{\\pi}{4};
    n \\approx 40 -> 40."""
    parts = _split_top(s, "\\approx")
    if len(parts) > 1 and all(parts):
        s = parts[1] if _is_label(parts[0]) else parts[0]
    parts = _split_top(s, "=")
    if len(parts) > 2 and all(parts):
        s = parts[0] + "=" + parts[-1] if _is_label(parts[0]) else parts[-1]
    return s


def _alternatives(s, gold=False):
    """Readings of a whole answer: itself (58,500 a number; in an answer also the list 58, 500), without
    its label, an inequality as an interval."""
    if len(_split_top(s, ",")) == 1:
        s = _value_part(s)
    alts = [s.replace(THOUSANDS, "")] + [s.replace(THOUSANDS, ",")] * (not gold) if THOUSANDS in s else [s]
    s = alts[-1]
    if len(parts := _split_top(s, "=")) == 2 and _is_label(parts[0]) and parts[1]:
        alts.append(parts[1])
    if m := re.fullmatch(r"[a-zA-Z]\\in(.+)", s):
        alts.append(m.group(1))
    if iv := _ineq_interval(s):
        alts.append(iv)
    return alts

# ----------------------------------------------------------------------------------------------
# comparison; results are tri-state: True, False, or None = "needs sympy" (when symbolic is off)


def _all3(results):
    out = True
    for r in results:
        if r is False:
            return False
        out = None if r is None else out
    return out


def equal(pred, gold, symbolic=False):
    """Is pred the same answer as gold? True / False / None (only sympy can decide, and symbolic is off).
    The gold decides the numeric tolerance. symbolic=True runs sympy here: call it only in a process that
    can be killed (reward.Grader's workers)."""
    try:
        p, g = normalize(pred), normalize(gold)
        if p == g:
            return bool(p)
        if not p or not g:
            return False
        out = False
        for pa in _alternatives(p):
            for ga in _alternatives(g, gold=True):
                r = True if pa == ga else _cmp(_struct(pa), _struct(ga), symbolic)
                if r:
                    return True
                if r is None:
                    out = None
        return out
    except (RecursionError, ValueError, ArithmeticError, MemoryError, TypeError, IndexError):
        return False  # absurd input: never raise into a training loop


def _cmp(a, b, ok):
    """a is the prediction, b the gold (the tolerance depends on how the gold is written)."""
    ka, kb = a[0], b[0]
    if ka == kb == "elem":
        return _cmp_elem(a[1], b[1], ok)
    if "elem" in (ka, kb) and "seq" in (ka, kb):  # an inequality (or D = (0, 1)) against an interval
        e, other = (a, b) if ka == "elem" else (b, a)
        iv = _ineq_interval(_value_part(e[1]))
        if iv is None:
            lbl = _split_top(e[1], "=")
            if len(lbl) != 2 or not _is_label(lbl[0]) or not lbl[1]:
                return False
            iv = lbl[1]  # D = (0, 1)
        e = _struct(iv)
        return _cmp(e, other, ok) if ka == "elem" else _cmp(other, e, ok)
    if "set" in (ka, kb):
        A = a[1] if ka == "set" else [a]
        B = b[1] if kb == "set" else [b]
        r = _match(A, B, ok)
        seq, lst = (a, b) if ka == "seq" else (b, a) if kb == "seq" else (None, None)
        if r is not True and seq and seq[1] == "()" and lst[0] == "set" and not lst[2] and len(seq[2]) == len(lst[1]):
            pairs = zip(a[2], b[1]) if ka == "seq" else zip(a[1], b[2])  # a tuple written as a bare list
            r2 = _all3(_cmp(x, y, ok) for x, y in pairs)
            r = True if r2 else (None if None in (r, r2) else False)
        return r
    if ka == "mat" and kb == "mat":  # same shape, same entries
        return [len(r) for r in a[1]] == [len(r) for r in b[1]] and _all3(
            _cmp(x, y, ok) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
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
    if (la := _labels(A)) and la == _labels(B):  # x = 1, y = 2 against y = 2, x = 1: values pair by label
        by_label = [sorted(X, key=lambda n: _split_top(n[1], "=")[0]) for X in (A, B)]
        return _all3(_cmp(x, y, ok) for x, y in zip(*by_label))
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


def _labels(nodes):
    """The sorted labels of two or more distinctly labelled values (x = 1, y = 2), else None."""
    sides = [_split_top(n[1], "=") for n in nodes if n[0] == "elem"]
    labels = sorted(x[0] for x in sides if len(x) == 2 and x[1] and _is_label(x[0]))
    return labels if len(nodes) == len(labels) == len(set(labels)) > 1 else None


def _relation(s):
    """(lhs, op, rhs) for a single relation a op b; None otherwise."""
    t = _REL.split(s)
    if len(t) != 3 or not t[0] or not t[2] or len(_split_top(s, t[1])) != 2:
        return None
    return t[0], t[1], t[2]


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?(?:([AaPp])\.?[Mm]\.?)?")


def _clock(m):
    h, mins, sec, half = m.groups()
    return [int(h) % 12 + (12 if half in ("P", "p") else 0) if half else int(h), int(mins), int(sec or 0)]


def _cmp_elem(x, y, ok):
    if x == y:
        return True
    x, y = _value_part(x), _value_part(y)
    if not x or not y:
        return False
    rx, ry = _relation(x), _relation(y)
    if rx and ry:
        if rx[1] == ry[1] == "=" and (rx[0] == ry[0] or (_is_label(rx[0]) and _is_label(ry[0]))):
            return _cmp_elem(rx[2], ry[2], ok)
        return _same_relation(rx, ry, ok)
    if rx or ry:
        r = rx or ry
        if r[1] == "=" and _is_label(r[0]):
            return _cmp_elem(r[2], y, ok) if rx else _cmp_elem(x, r[2], ok)
        return False
    if _REL.search(x) or _REL.search(y):
        return False  # chains that did not read as intervals compare as strings only
    cx, cy = _CLOCK.fullmatch(x), _CLOCK.fullmatch(y)
    if cx or cy:  # a clock time is not a ratio: 5:00 is not 5/0
        return bool(cx and cy) and _clock(cx) == _clock(cy)
    wx, wy = re.fullmatch(r"[A-Za-z]{3,}", x), re.fullmatch(r"[A-Za-z]{3,}", y)
    if wx and wy:  # word answers: "Evelyn", "east", "ellipse"
        return x.lower() == y.lower()
    nx, ny = _number(x), _number(y)
    if nx and ny and (r := _num_equal(nx, ny)) is not None:
        return r
    if (nx and wy) or (wx and ny):
        return False
    long_decimal = nx and not ny and nx.ulp is not None and nx.sig >= LONG_DECIMAL
    return _symbolic("equal", x, y, nx.ulp if long_decimal else None) if ok else None


def _same_relation(rx, ry, ok):
    """a op b and c op' d are the same relation if a - b = k (c - d) for a constant k != 0, with op' = op
    (k > 0) or op' = op flipped (k < 0, inequalities); checked at the evaluator's random points."""
    fx, fy = _number(f"{rx[0]}-({rx[2]})"), _number(f"{ry[0]}-({ry[2]})")
    if fx is None or fy is None:
        return _symbolic("relation", rx, ry) if ok else None
    vx, vy = fx.vals, fy.vals
    if len(vx) != len(vy) or len(vx) == 1:  # one side has letters the other lacks, or no letters at all
        return False
    ratios = []
    for a, b in zip(vx, vy):
        if (a == 0) != (b == 0):
            return False
        if b != 0:
            ratios.append(_arith(operator.truediv, a, b))
    same = _all3(_value_equal(r, ratios[0]) for r in ratios[1:]) if ratios else False
    if same is not True:
        return same if same is False or not ok else _symbolic("relation", rx, ry)
    if rx[1] in ("=", "\\neq") or ry[1] in ("=", "\\neq"):
        return rx[1] == ry[1]
    return rx[1] == (ry[1] if ratios[0] > 0 else _FLIP[ry[1]])


def _symbolic(kind, x, y, abs_tol=None):
    import symbolic  # sympy: only ever reached with symbolic=True, i.e. in a worker process
    return symbolic.compare(kind, x, y, abs_tol)

# ----------------------------------------------------------------------------------------------
# 3. the evaluator: numbers, letters, \frac, \sqrt, \pi, + - * / ^ and implicit products, read as sympy
# reads them, exactly as Fractions while rational, else as 80-digit Decimals (sympy decides constants
# numerically too). Letters are variables set to the same 3 fixed random integers on both sides:
# polynomials of degree d that differ agree at a random point of [100, 10^4)^n with probability < d/10^4.

_POINTS = [{c: Fraction(random.Random(131 * k + ord(c)).randrange(100, 10**4)) for c in
            "abcdfghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"} for k in range(3)]  # e, i: constants
_TOKEN = re.compile(r"\\[a-zA-Z]+|\d+(?:\.\d*)?|\.\d+|\S")
_DECIMAL = decimal.Context(prec=80)
_PI = _DECIMAL.create_decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899862803")


def _dec(x):
    return x if isinstance(x, Decimal) else Decimal(x.numerator) / x.denominator


def _arith(op, a, b):
    if type(a) is not type(b):  # Fraction and Decimal do not mix
        return op(_dec(a), _dec(b))
    out = op(a, b)
    if isinstance(out, Fraction) and max(out.numerator.bit_length(), out.denominator.bit_length()) > MAX_BITS:
        raise ValueError("too big")  # a long product of big powers: sympy's (under a time limit) or nobody's
    return out


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
    return _arith(lambda b, k: b ** k, base, Fraction(n)) if isinstance(base, Fraction) else base ** n


def _eval_at(s, point):
    """(value, uses letters) of s with letters from point. ValueError outside this grammar."""
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
        if t in ("\\frac", "\\sqrt"):  # normalize braced their arguments
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


# An evaluated answer: values at the points (one when constant); inexact: written with a decimal point or in
# scientific notation; ulp: the unit of its last stated digit when it is one plain decimal (2718.54 -> 0.01,
# 8.7 \times 10^8 -> 10^7; never finer than its DOUBLE_DIGITS-th digit); sig: its significant digits; pct: ends in %.
Num = collections.namedtuple("Num", "vals inexact ulp sig pct")
_PLAIN = re.compile(r"[+-]?(\d*)\.?(\d*)(?:(?:\\times|\\cdot|\*)10\^\{?([+-]?\d+)\}?|[eE]([+-]?\d+))?")


@functools.lru_cache(maxsize=1 << 16)  # golds repeat 16x in a group
def _number(s):
    """Num for an answer the evaluator can read, else None."""
    pct = s.endswith("%")
    s = s[:-1] if pct else s
    inexact = "." in s or re.search(r"(\\times|\\cdot|\*)10\^|\d[eE][+-]?\d", s) is not None
    ulp, sig = None, 0
    if (m := _PLAIN.fullmatch(s)) and inexact and (m.group(1) or m.group(2)):
        sig, exp = len((m.group(1) + m.group(2)).lstrip("0")), int(m.group(3) or m.group(4) or 0) - len(m.group(2))
        if abs(exp) > MAX_DIGITS:
            return None  # 1e999999: refused before any arithmetic
        ulp = Fraction(10) ** (exp + max(0, sig - DOUBLE_DIGITS))
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
        return Num(tuple(vals), inexact, ulp, sig, pct)
    except (ValueError, ArithmeticError, RecursionError):  # DivisionByZero, Overflow are Arithmetic
        return None


def _readings(n):
    """(values, ulp) readings of a number: itself, and x/100 when written as x%."""
    out = [(n.vals, n.ulp)]
    if n.pct:
        out.append((tuple(_arith(operator.truediv, v, Fraction(100)) for v in n.vals), n.ulp and n.ulp / 100))
    return out


def _num_equal(p, g):
    """Exact, except: against a gold written as a decimal (a measurement, or money) within 1e-4 relative
    and within half a unit of the gold's last stated digit; a prediction of LONG_DECIMAL+ significant
    digits within one unit of its last digit (0.142857142857143 is 1/7). None: too close to call."""
    out, n = False, max(len(p.vals), len(g.vals))
    for pv, pulp in _readings(p):
        for gv, gulp in _readings(g):
            pairs = zip(pv * (n // len(pv)), gv * (n // len(gv)))
            if g.inexact:
                r = _all3(_value_equal(a, b, min(GOLD_TOL * abs(Fraction(b)), gulp / 2 if gulp else math.inf))
                          for a, b in pairs)
            elif pulp is not None and p.sig >= LONG_DECIMAL:
                r = _all3(_value_equal(a, b, pulp) for a, b in pairs)
            else:
                r = _all3(_value_equal(a, b) for a, b in pairs)
            if r:
                return True
            out = None if r is None else out
    return out


def _value_equal(a, b, bound=None):
    """|a - b| <= bound, or a == b when bound is None; None when Decimals are too close to the line."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b if bound is None else abs(a - b) <= bound
    with decimal.localcontext(_DECIMAL):
        a, b = _dec(a), _dec(b)
        diff, scale = abs(a - b), max(abs(a), abs(b))
        if bound is None:
            rel = diff / scale if scale else Decimal(0)
            return True if rel < Decimal("1e-30") else False if rel > Decimal("1e-20") else None
        line = _dec(bound)
        return None if abs(diff - line) <= Decimal("1e-20") * (scale or 1) else diff <= line
