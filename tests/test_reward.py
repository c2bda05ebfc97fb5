"""Table-driven tests for reward.py: extraction, equivalence in both directions, bad input, the pool."""
import json
import os
import subprocess
import sys
import time

import pytest

import grader as G
import reward as R

# ---------------------------------------------------------------------------------------------
# extraction

EXTRACT = [  # (text, require_think, expected)
    ("<think>a</think> so \\boxed{5}", True, "5"),
    ("a</think> \\boxed{5}", True, "5"),                               # template already opened <think>
    ("no think tag \\boxed{5}", True, None),
    ("no think tag \\boxed{5}", False, "5"),
    ("</think> \\boxed{1} then \\boxed{2}", True, "2"),                 # last box wins
    ("\\boxed{7} </think> no box after", True, None),                   # boxes in the reasoning do not count
    ("x</think>\\boxed{7}</think> \\boxed{8}", True, "8"),
    ("</think> \\boxed{\\frac{1}{2}}", True, "\\frac{1}{2}"),
    ("</think> \\boxed{\\frac{\\sqrt{3}}{\\frac{1}{2}}}.", True, "\\frac{\\sqrt{3}}{\\frac{1}{2}}"),
    ("</think> \\fbox{42}", True, "42"),
    ("</think> \\boxed 5$", True, "5"),
    ("</think> \\boxed {12}", True, "12"),
    ("</think> \\boxed{\\{1,2\\}}", True, "\\{1,2\\}"),                 # escaped braces are not groups
    ("</think> \\boxed{\\left\\{ 1 \\right\\}}", True, "\\left\\{ 1 \\right\\}"),
    ("</think> \\boxed{\\frac{1}{2}", True, None),                      # unterminated (truncated)
    ("</think> \\boxed{", True, None),
    ("</think> \\boxed{}", True, None),
    ("</think> \\boxed", True, None),
    ("</think> ", True, None),
    ("", True, None),
    ("", False, None),
    (None, True, None),
    (123, False, None),
    ("</think> \\boxed{\\boxed{3}}", True, "3"),
    ("</think> \\boxed{x = \\dfrac{3}{4}}", True, "x = \\dfrac{3}{4}"),
]


@pytest.mark.parametrize("text,think,want", EXTRACT)
def test_extract(text, think, want):
    assert R.extract_answer(text, require_think=think) == want


def test_extract_megabyte_and_deep_nesting_is_fast():
    big = "x " * 500_000 + "</think> " + "{" * 50_000 + " \\boxed{" + "{" * 10_000
    t = time.perf_counter()
    assert R.extract_answer(big) is None
    assert R.extract_answer("</think>\\boxed{" + "a" * 1_000_000 + "}") is None  # too long to be an answer
    assert R.extract_answer("a" * 1_000_000 + "</think>\\boxed{3}") == "3"
    assert time.perf_counter() - t < 1.0

# ---------------------------------------------------------------------------------------------
# equivalence tables: (pred, gold) pairs that must match, and pairs that must not


SAME = {
    "normalise": [
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("\\dfrac{3}{56}", "\\frac{3}{56}"),
        ("\\tfrac{3}{56}", "\\frac{3}{56}"), ("10,\\!080", "10080"), ("10{,}080", "10080"), ("58,500", "58500"),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100"), ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("90°", "90"),
        ("\\$32,\\!348", "32348"), ("\\$18.90", "18.90"), ("5.4 \\text{ cents}", "5.4"), ("864 \\mbox{ inches}^2", "864"),
        ("15\\mbox{ cm}^2", "15"), ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"), ("\\text{Evelyn}", "Evelyn"),
        ("\\text{east}", "East"), ("\\text{(C)}", "C"), ("\\text{(C)}", "(C)"), ("\\textbf{(B)}", "B"),
        ("x=5", "5"), ("5", "x=5"), ("x = 5", "5"), ("k=1", "$k=1$"), ("\\sqrt3", "\\sqrt{3}"), ("11\\sqrt2", "11\\sqrt{2}"),
        ("\\frac12", "\\frac{1}{2}"), ("\\frac 59", "\\frac{5}{9}"), ("\\frac9{19}", "\\frac{9}{19}"), ("\\frac43", "\\frac{4}{3}"),
        ("1\\frac{4}{5}", "1.8"), ("137 \\frac{1}{2}", "137.5"), ("5.", "5"), ("025", "25"), ("073", "73"), (".35625", "0.35625"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"), ("\\frac{1}{2}\n", "\\frac{1}{2}"), ("\\displaystyle\\frac{1}{2}", "0.5"),
        ("3\\,\\sqrt{5}", "3 \\sqrt{5}"), ("3\\!\\sqrt{5}", "3\\sqrt{5}"), ("6 - 5i", "6-5i"), ("52_8", "52_{8}"),
        ("4210_5", "4210_{5}"), ("\\pi r", "\\pi r"), ("−3", "-3"), ("π", "\\pi"), ("√2", "\\sqrt{2}"),
        ("\\boxed{7}", "7"), ("1950^\\circ C", "1950"), ("4.4677 \\times 10^{14} Hz", "4.4677 \\times 10^{14}"),
        ("\\mathbf{5}", "5"), ("\\quad(2+\\sqrt{2}, 1+\\sqrt{2})", "(2+\\sqrt{2},1+\\sqrt{2})"), ("8 \\%", "8%"),
        ("\\text{ellipse}", "ellipse"), ("2 \\text{ and } 3", "2, 3"), ("\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]",
                                                                         "[\\frac{\\pi^{2}}{8},\\frac{5\\pi^{2}}{4}]"),
    ],
    "numbers": [
        ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"), ("1/2", "0.5"), ("-\\frac{35}{9}", "\\frac{-35}{9}"),
        ("142", "142.0"), ("2.50", "2.5"), ("+2", "2"), ("-0", "0"), ("1.25", "\\frac54"), ("3/20", "0.15"),
        ("0.0000672", ".0000672"), ("6.72 \\times 10^{-5}", ".0000672"), ("6.72e-5", "0.0000672"),
        ("4.5 \\times 10^{33}", "4.5e33"), ("10^{-3}", "1 \\times 10^{-3}"), ("0.001", "10^{-3}"), ("1024", "2^{10}"),
        ("2^{10}", "1024"), ("\\frac{1}{1024}", "2^{-10}"), ("8.70001e8", "8.7 \\times 10^{8}"), ("4.4902", "4.49"),
        ("62.5", "62.5%"), ("0.625", "62.5%"), ("62.5\\%", "0.625"), ("17.5%", "17.5"),
        ("3000000", "3 \\times 10^6"), ("\\sqrt{4}", "2"), ("\\sqrt{117}", "3\\sqrt{13}"), ("\\frac{\\sqrt3}{3}", "\\frac{1}{\\sqrt{3}}"),
        ("\\frac{2\\sqrt{5}}{5}", "\\frac{2}{\\sqrt5}"), ("4\\pi", "\\frac{8\\pi}{2}"), ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi"),
        ("2^{1009}", "2^{1009}"), ("2 \\cdot 2^{1008}", "2^{1009}"), ("\\frac{100!}{2^{50}}", "\\frac{100!}{2^{50}}"),
        ("\\sqrt[3]{7}", "7^{1/3}"), ("\\frac{8}{\\sqrt[3]{7}}", "8 \\cdot 7^{-1/3}"), ("1+i\\sqrt{3}", "1 + \\sqrt{3}i"),
        ("-8-8\\sqrt{3}i", "-8-8 \\sqrt{3} i"), ("\\ln 2 + \\frac{i\\pi}{3}", "\\ln 2 + i\\frac{\\pi}{3}"),
        ("\\arcsin{\\frac{10}{13}}", "\\arcsin{\\frac{1}{1.3}}"), ("\\frac{\\log 2}{\\log 2-\\log 3}", "\\frac{\\log 2}{\\log 2 - \\log 3}"),
        ("\\binom{6}{3}", "20"), ("5!", "120"), ("3.14159", "3.14159"), ("1.6 \\times 10^{3}", "1600"), ("\\frac{4 \\cdot 999^{4}}{27}", "\\frac{4\\cdot 999^4}{27}"),
        ("2021 \\cdot 505 \\cdot 337", "343943885"), ("0.1", "\\frac{1}{10}"), ("\\frac{6}{4}", "\\frac{3}{2}"), ("7\\pi", "7 \\pi"),
        ("1,234", "1234"), ("1234", "1,234"), ("12\\,345", "12345"),
    ],
    "structures": [
        ("(6,31,-1)", "(6, 31, -1)"), ("(-2,1)", "\\left(-2, 1\\right)"), ("(3,4]", "(3, 4]"), ("[-2,7]", "x \\in [-2,7]"),
        ("(2,\\infty)", "(2, \\infty)"), ("(-\\infty,0]", "(-\\infty, 0]"), ("(0,9)\\cup(9,36)", "(9,36) \\cup (0,9)"),
        ("(-\\infty,0)\\cup\\{1\\}", "$(-\\infty, 0) \\cup\\{1\\}$."), ("-2, 1", "1,-2"), ("1,-2", "-2,1"), ("7,5,3", "3, 5, 7"),
        ("\\{3,5,7\\}", "3, 5, 7"), ("3,5,7", "\\{3, 5, 7\\}"), ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}"),
        ("1 \\pm \\sqrt{19}", "1-\\sqrt{19},1+\\sqrt{19}"), ("3 \\pm 2\\sqrt2", "3 \\pm 2 \\sqrt{2}"),
        ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt5, 1-\\sqrt5"), ("(1,8,19), (2,7,13), (4,5,7)", "(4,5,7),(1,8,19),(2,7,13)"),
        ("(3,2)", "$(3,2)$"), ("(p,q)=(3,2)", "(3,2)"), ("(3,2)", "3,2"), ("3, 2", "(3,2)"), ("-2,-2", "-2"),
        ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\\\ \\frac53 \\end{pmatrix}"),
        ("\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
        ("(-7,16,5)", "\\begin{pmatrix} -7 \\\\ 16 \\\\ 5 \\end{pmatrix}"), ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "(0.2,-3.6)"),
        ("x > 5", "(5,\\infty)"), ("(5,\\infty)", "x>5"), ("k \\ge 2", "k \\geqslant 2"), ("[2,\\infty)", "$k \\geqslant 2$"),
        ("2 \\le k", "k\\geq 2"), ("x<-1", "(-\\infty,-1)"), ("-2 \\le x \\le 7", "[-2,7]"), ("3 > x \\geq 1", "[1,3)"),
        ("y = 3 + 2x", "y = 2x + 3"), ("2x+3", "y = 2x + 3"), ("y=-2x", "-2x"), ("-5x+7y-11z-4=0", "5x - 7y + 11z + 4 = 0"),
        ("10x-14y+22z+8=0", "5x - 7y + 11z + 4 = 0"), ("f(x)=x,f(x)=2-x", "$f(x)=x$,$f(x)=2-x$"), ("x, 2-x", "$f(x)=x$,$f(x)=2-x$"),
        ("f(n)=n", "$f(n)=n$"), ("n", "$f(n)=n$"), ("M = 2^{N-2}+1", "$M=2^{N-2}+1$"), ("x=1, 2", "1,2"), ("x=1,x=2", "1,2"),
        ("\\{1,3\\}", "1,3"), ("a=2, a=-6-4\\sqrt2", "$a=2$, $a=-6-4 \\sqrt{2}$"), ("(-\\infty,\\infty)", "\\mathbb{R}"),
        ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(\\frac35, \\frac83]"), ("(0.6,\\frac{8}{3}]", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]"),
        ("E_1, E_2", "E_{1},E_{2}\n"), ("SRAC=LRAC", "SRAC=LRAC\n"),
    ],
    "symbolic": [
        ("p-q", "p - q"), ("-q+p", "p-q"), ("x^5 - x^4 + x^3 - x^2 + x - 1", "(x-1)(x^4+x^2+1)"), ("x^3+3x-6", "3x+x^3-6"),
        ("2k+2", "2(k+1)"), ("(a+5)(b+2)", "ab+2a+5b+10"), ("\\cot x", "\\frac{\\cos x}{\\sin x}"), ("\\sin^2 x", "1-\\cos^2 x"),
        ("\\frac{n(n+1)}{2}", "\\frac{n^2+n}{2}"), ("\\binom{2n}{n}", "\\frac{(2n)!}{(n!)^2}"), ("2^{k-1}", "\\frac{2^k}{2}"),
        ("\\frac{1}{2n+2}", "\\frac{1}{2 n+2}"), ("\\frac{e^{t}}{3}+ce^{-2t}", "\\frac{e^{t}} {3}+c e^{-2 t}"),
        ("ce^{-2t}+\\frac{e^t}{3}", "\\frac{e^{t}}{3}+ce^{-2t}"), ("\\frac{c}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}c"),
        ("\\frac{1}{2}(e^{at}+e^{-at})", "\\frac{1}{2} (e^{at} + e^{-at})"), ("\\cosh(at)", "\\frac{1}{2}(e^{at}+e^{-at})"),
        ("3R^2", "3 R^{2}"), ("\\sqrt{2}\\cos(2t-\\pi/4)", "\\cos 2t + \\sin 2t"), ("\\frac{t}{m}", "\\frac{1}{m}t"),
        ("s^2+bs+1", "s^{2}+b s+1"), ("\\frac{a M^{1/3}}{G M^{2/3}+b}", "\\frac{a M^{1/3}}{G M^{2/3} + b}"),
        ("\\lfloor \\log_2 n \\rfloor + 1", "\\left\\lfloor\\log _{2} n\\right\\rfloor+1"), ("n^2-n+1", "n^{2}-n+1"),
        ("\\frac{1}{4}n(n+1)", "\\frac{n^2+n}{4}"), ("2^{-2/3}, 8", "$2^{-2 / 3}$, $8$"), ("4 \\pi^2 - 1", "4\\pi^{2}-1"),
        ("\\frac{1-p^2}{3}", "\\frac{1-p^{2}}{3}"), ("x \\sqrt{2}", "\\sqrt{2}x"), ("(n-2)2^n+1", "(n-2) 2^{n}+1"),
        ("\\frac{N}{2}", "0.5N"), ("2n^2-2n+1", "2 n^{2}-2 n+1"), ("k(4k^2+k-1)/2", "k\\left(4 k^{2}+k-1\\right) / 2"),
        ("\\frac{d!}{2k(d-k)!}", "\\frac{d !}{2 k(d-k) !}"), ("2^{n}-n-1", "2^n - (n+1)"), ("-\\frac{n-1}{2}", "$-(n-1) / 2$"),
        ("\\frac{x}{2} - \\frac{1}{4} + ce^{-2x}", "\\frac{2x-1}{4} + ce^{-2x}"), ("\\frac{1}{s+a}", "(s+a)^{-1}"),
        ("\\frac{\\cos(2t)}{15}", "\\frac{\\cos (2 t)}{15}"), ("100p^{1/2}", "100 p^{\\frac{1}{2}}"), ("100\\sqrt{p}", "100p^{\\frac{1}{2}}"),
    ],
}
DIFFERENT = {
    "numbers": [
        ("1", "2"), ("25", "250"), ("0.5", "\\frac{1}{3}"), ("0.3333", "\\frac13"), ("0.33", "\\frac{1}{3}"),
        ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}"), ("2^{1009}+1", "2^{1009}"), ("2^{1009}", "2^{1008}"), ("1000.05", "1000"),
        ("999", "1000"), ("8.8e8", "8.7 \\times 10^{8}"), ("62", "62.5%"), ("6.25", "62.5%"), ("-4", "4"), ("4", "-4"),
        ("\\frac{3}{2}", "\\frac{2}{3}"), ("\\sqrt{2}", "\\sqrt{3}"), ("3\\sqrt{13}", "13\\sqrt{3}"), ("1.414", "\\sqrt{2}"),
        ("3.14159", "\\pi"), ("\\pi", "3"), ("2\\pi", "\\pi"), ("6+5i", "6 - 5i"), ("52", "25_8"), ("1,234", "1235"),
        ("10^{-3}", "10^{-4}"), ("1 \\times 10^{-3}", "1 \\times 10^{3}"), ("120", "5"), ("0", "0.0001"), ("1\\frac{4}{5}", "4"),
        ("\\frac{4}{5}", "1\\frac{4}{5}"), ("100", "10^{3}"), ("7", "\\text{seven}"), ("Evelyn", "Navin"), ("east", "west"),
        ("A", "\\text{(C)}"), ("(B)", "\\text{(C)}"), ("5", "x"), ("x", "5"), ("1", "i"), ("e", "2.718"),
        ("1", "\\infty"), ("\\infty", "-\\infty"), ("0", "\\frac{1}{0}"), ("2", "\\sqrt{2}"), ("\\sqrt{8}", "2\\sqrt{3}"),
        ("6.5", "6.4"), ("41.8", "41.9"), ("3", "3.01"), ("12", "13"),
        ("6631", "6630.65"),  # was SAME under a plain 1e-4 tolerance; issue 15: a decimal gold's stated digits must agree
    ],
    "structures": [
        ("(3,4]", "(3,4)"), ("[3,4]", "(3,4]"), ("[3,4)", "(3,4]"), ("(2,3)", "(3,2)"), ("(1,2,3)", "(1,2)"), ("1,2", "1,2,3"),
        ("1", "1,2"), ("1,2", "1"), ("(0,9)\\cup(9,36)", "(0,9] \\cup (9,36)"), ("(0,36)", "(0,9)\\cup(9,36)"),
        ("1+\\sqrt{19}", "1 \\pm \\sqrt{19}"), ("3 + 2\\sqrt2", "3 \\pm 2 \\sqrt{2}"), ("\\{1,2\\}", "\\{1,3\\}"),
        ("(1,8,19), (2,7,13)", "(1,8,19), (2,7,13), (4,5,7)"), ("(1,8,19), (2,13,7), (4,5,7)", "(1,8,19), (2,7,13), (4,5,7)"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
        ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}"),
        ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}"),
        ("x > 5", "[5,\\infty)"), ("x \\geq 5", "(5,\\infty)"), ("x < 5", "(5,\\infty)"), ("k \\geq 3", "k \\geqslant 2"),
        ("(5,\\infty)", "(-\\infty,5)"), ("5x-7y+11z+5=0", "5x - 7y + 11z + 4 = 0"), ("5x-7y+11z=0", "5x - 7y + 11z + 4 = 0"),
        ("y = 2x + 4", "y = 2x + 3"), ("2x+4", "y = 2x + 3"), ("x+y=5", "5"), ("f(x)=x", "$f(x)=x$,$f(x)=2-x$"),
        ("(3,2)", "(3,2),(5,7)"), ("[2,7]", "x \\in [-2,7]"), ("\\{3\\}", "3, 5"), ("-2,1", "(-2,1]"),
    ],
    "symbolic": [
        ("p+q", "p - q"), ("x^5 - x^4 + x^3 - x^2 + x + 1", "(x-1)(x^4+x^2+1)"), ("2k+1", "2(k+1)"), ("\\tan x", "\\cot x"),
        ("\\frac{n(n-1)}{2}", "\\frac{n(n+1)}{2}"), ("\\lfloor n/2\\rfloor", "\\lceil n/2\\rceil"), ("2^{k}", "2^{k-1}"),
        ("\\frac{e^{t}}{3}-ce^{-2t}", "\\frac{e^{t}}{3}+ce^{-2t}"), ("\\frac{e^{t}}{3}", "\\frac{e^{t}}{3}+ce^{-2t}"),
        ("3r^2", "3R^2"), ("n^2", "n^2+1"), ("\\sin x", "\\cos x"), ("x", "x^2"), ("\\sqrt{x}", "x"), ("\\ln 2", "\\ln 3"),
        ("\\frac{1}{m}", "\\frac{1}{m}t"), ("s^2+bs-1", "s^{2}+b s+1"), ("\\binom{2n}{n}", "\\binom{2n}{n+1}"),
    ],
}


def _cases(table):
    return [pytest.param(p, g, id=f"{cat}:{p[:30]}|{g[:30]}") for cat, rows in table.items() for p, g in rows]


@pytest.mark.parametrize("pred,gold", _cases(SAME))
def test_same(pred, gold):
    assert R.is_equiv(pred, gold) is True


@pytest.mark.parametrize("pred,gold", _cases(DIFFERENT))
def test_different(pred, gold):
    assert R.is_equiv(pred, gold) is False


def test_table_size():
    n = sum(map(len, SAME.values())) + sum(map(len, DIFFERENT.values()))
    assert n >= 300, n

# ---------------------------------------------------------------------------------------------
# reward(): gold formats as the datasets store them


def box(ans, think=True):
    return ("Long reasoning...\n</think>\n" if think else "") + f"The answer is $\\boxed{{{ans}}}$."


GOLDS = [  # (boxed answer, gold as stored, expected reward)
    ("25", "025", 1.0), ("025", "025", 1.0), ("26", "025", 0.0), ("142", 142.0, 1.0), ("142.0", 142.0, 1.0),
    ("-4", -4.0, 1.0), ("143", 142.0, 0.0), ("0.5", 0.5, 1.0), ("7", 7, 1.0), ("9.6", ["9.6\n"], 1.0),
    ("0.02", ["0.01\n", "0.02\n"], 1.0), ("0.03", ["0.01\n", "0.02\n"], 0.0), ("\\frac{1}{2}", ["$\\frac{1}{2}$"], 1.0),
    ("69, 84", ["$69$,$84$"], 1.0), ("(2,4)", ["$(2,4)$"], 1.0), ("6630", ["6630.65\n", "6630\n"], 1.0),
    ("\\frac{10}{13}", ["\\arcsin{\\frac{1}{1.3}}", "\\arcsin{\\frac{10}{13}}\n"], 0.0),
    ("\\arcsin(10/13)", ["\\arcsin{\\frac{1}{1.3}}", "\\arcsin{\\frac{10}{13}}\n"], 1.0),
    ("7.5 \\times 10^{7}", ["7.5 \\times 10^7", "7.5 \\times 10^7\n"], 1.0), ("x", [], 0.0), ("x", None, 0.0),
    ("2", ["2", None], 1.0),
]


@pytest.mark.parametrize("ans,gold,want", GOLDS)
def test_reward_gold_formats(ans, gold, want):
    assert R.reward(box(ans), gold) == want


def test_reward_think_templates():
    # DeepSeek's newer template opens <think> in the prompt: the response has only </think>.
    assert R.reward("reasoning </think> \\boxed{5}", "5") == 1.0
    assert R.reward("<think>reasoning</think> \\boxed{5}", "5") == 1.0
    assert R.reward("reasoning, never finished \\boxed{5}", "5") == 0.0
    assert R.reward("plain model: \\boxed{5}", "5", require_think=False) == 1.0

# ---------------------------------------------------------------------------------------------
# bad input: 0.0 / False / None, never an exception, bounded time


BAD = ["", " ", "{", "}", "{{{", "}}}", "\\frac{1}{", "\\frac{", "\\sqrt{", "\\left(", "(", ")", "[", "(]", "\\{", "\\}",
       "{" * 5000, "\\frac{" * 500, "(" * 3000, "x" * 100_000, "1" * 5000, "你好", "😀", "\x00", "\\", "\\\\", "$", "$$",
       "=", "==", ",", ",,,", "\\pm", "\\cup", "^", "_", "\\begin{pmatrix}", "\\end{pmatrix}", "10^{10^{10}}",
       "2^{2^{2^{2^{2^{2}}}}}", "10^{10^{10^{10}}}", "(10^{10^{10}})!", "\\binom{10^{10}}{5}", "9^{9^{9}}-9^{9^{9}}",
       "1e999999", "10^{999999}", "\\int_0^1 x dx", "\\sum_{n=1}^{\\infty} n", "\\lim_{x\\to0} x", "None", "nan", "inf",
       "\\frac{1}{0}", "0/0", "\\infty", "-\\infty", "x=", "=5", "<", "\\leq", "1 <", "\\text{", "\\text{}", "\\mbox{5"]


@pytest.fixture(scope="module")
def shared_worker():
    """reward()/is_equiv() send what needs sympy to a shared worker; boot it (~1-3 s) outside the timings."""
    assert R.is_equiv("\\sin^2 x + \\cos^2 x", "1")


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_bad_input(bad, shared_worker):
    t = time.perf_counter()
    assert R.is_equiv(bad, "1") is False
    assert R.is_equiv("1", bad) is False
    assert R.reward(box(bad), "3") == 0.0
    assert R.reward(bad, "3") == 0.0
    assert R.reward(bad, bad, require_think=False) in (0.0, 1.0)
    assert time.perf_counter() - t < 2.0


def test_non_string_inputs():
    assert R.is_equiv(None, "1") is False and R.is_equiv(1, "1") is False
    assert R.reward(None, "1") == 0.0 and R.reward(box("1"), {"a": 1}) in (0.0, 1.0)


def test_guard_refuses_giant_numbers_quickly(shared_worker):
    t = time.perf_counter()
    assert R.is_equiv("10^{10^{10}}", "10^{10^{10}}+1") is False
    assert R.is_equiv("(10^{8})!", "1") is False
    assert R.is_equiv("2^{2^{40}}", "2^{2^{40}}") is True  # identical strings need no arithmetic
    assert time.perf_counter() - t < 2.0

# ---------------------------------------------------------------------------------------------
# the batch grader


@pytest.fixture(scope="module")
def grader():
    # guard=False lets 10^{10^{10}} reach sympy, where it hangs in C big-integer code: only the
    # kill-and-replace timeout can stop it.
    with R.Grader(num_workers=1, timeout=1.0, guard=False) as g:
        yield g


def test_grader_matches_reward_in_order(grader):
    resp = [box("\\sqrt{4}"), box("2"), box("3"), "no think \\boxed{2}", box("\\frac{2}{\\sqrt{2}}"), box("x=2"),
            box("2"), box("\\sqrt{4}")]
    golds = ["2", "2", "2", "2", ["$\\sqrt{2}$\n"], 2.0, ["1", "2"], "2"]
    out = grader.grade(resp, golds)
    assert out == [R.reward(r, g) for r, g in zip(resp, golds)]
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert grader.grade(["plain \\boxed{2}"], ["2"], require_think=False) == [1.0]
    assert grader.grade([], []) == []


def test_grader_dedupes_and_fast_paths(grader):
    before = dict(grader.stats)
    out = grader.grade([box("\\sqrt[3]{27}")] * 16 + [box("3")] * 16 + [box("\\sqrt{9}")] * 8, ["3"] * 40)
    assert out == [1.0] * 40
    assert grader.stats["unique"] - before.get("unique", 0) == 3
    assert grader.stats["sympy"] - before.get("sympy", 0) == 1  # 3 and \sqrt{9} never leave the parent


def test_grader_kills_hung_worker_and_recovers(grader):
    before = grader.stats["timeouts"]
    resp = [box("10^{10^{10}}"), box("\\sqrt{16}"), box("5")]
    t = time.perf_counter()
    out = grader.grade(resp, ["1", "4", "5"])
    dt = time.perf_counter() - t
    assert out == [0.0, 1.0, 1.0]
    assert grader.stats["timeouts"] == before + 1
    assert dt < grader.timeout + 0.5 + 1.0, dt  # + slack for a loaded test machine
    t = time.perf_counter()
    assert grader.grade([box("\\sqrt{25}")], ["5"]) == [1.0]  # the spare took over at once
    assert time.perf_counter() - t < 1.0


def test_grader_bad_arguments(grader):
    with pytest.raises(ValueError, match="responses"):
        grader.grade(["a"], [])
    with pytest.raises(ValueError, match="num_workers"):
        R.Grader(num_workers=0)
    g = R.Grader(num_workers=1, spares=0)
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.grade([], [])


def test_workers_do_not_import_torch():
    code = ("import sys, reward; sys.stdout = sys.stderr; "
            "reward.is_equiv('\\\\sqrt{2}', '2^{1/2}'); print('torch' in sys.modules, file=sys.__stdout__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_cli(tmp_path):
    rows = [{"response": box("\\frac{1}{2}"), "answer": "0.5"}, {"response": box("3"), "answer": ["$4$"]},
            {"response": box("x^2"), "answer": "x^{2}"}, {"response": "truncated \\boxed{", "answer": "1"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cli in (["reward.py", str(path)], ["bench/reward.py", "--grade", str(path)]):  # the command, the bench's
        out = subprocess.run([sys.executable, os.path.join(root, cli[0]), *cli[1:], "--workers", "1"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "accuracy: 2/4 = 50.00%" in out.stdout
    path.write_text('{"response": "x"}\n')
    out = subprocess.run([sys.executable, os.path.join(root, "reward.py"), str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "rows.jsonl:1: row needs 'response' and 'answer'" in out.stderr


def test_evaluator_decides_common_answers_without_sympy():
    fast = [("\\sqrt{2}\\cdot\\sqrt{8}", "4", True), ("10^{40}+1", "10^{40}", False), ("2\\sqrt{3}", "\\sqrt{12}", True),
            ("\\frac{\\pi}{2}", "1.5708", True), ("\\frac{\\pi}{2}", "1.571", False), ("2n^2-2n+1", "2n(n-1)+1", True),
            ("1/2x", "\\frac{1}{2x}", True), ("1/2x", "\\frac{x}{2}", False), ("7", "(t-11)(t+11)", False),
            ("x^23", "x^{23}", True), ("3\\sqrt{2}", "4.2426", True), ("3\\sqrt{2}", "4.25", False)]
    for pred, gold, want in fast:
        assert G.equal(pred, gold) is want, (pred, gold)  # sympy not allowed
    for pred, gold in [("(-1)^{2n}", "1"), ("\\sin^2x+\\cos^2x", "1"), ("e^{0}", "1"), ("\\sqrt[3]{8}", "2")]:
        assert G.equal(pred, gold) is None, (pred, gold)  # left to sympy
