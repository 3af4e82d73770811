"""Arithmetic word problems with Python-computed answers, and the "Answer: N" checker.

Each sample picks one of a dozen problem kinds (one to three steps: sums, differences,
products, exact divisions, change from a purchase, discounts, averages), draws numbers whose
answer is a whole number, and writes a short worked solution ending in an ``Answer: N`` line.
Every number is computed in Python, never typed, and every worked line is checked.

The worked lines do multi-digit arithmetic by place value, one easy step at a time, because a
135M model gets ``279 + 73`` wrong far more often than ``279 + 70`` and ``349 + 3``::

    279 + 73 = 279 + 70 + 3 = 349 + 3 = 352
    27 * 8 = 20 * 8 + 7 * 8 = 160 + 56 = 216

Checking reads the number on the last ``Answer:`` line of the output (a ``$`` sign and
thousands commas are allowed) and compares it with the expected answer.

This module knows nothing about models, chat templates or training.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Callable

from train.task_common import FIRST_NAMES

NAME = "math"

_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "stamps", "balloons")
_PRONOUN = {n: ("she" if n in {"Maria", "Anna", "Priya", "Sofia", "Emma", "Lena", "Fatima", "Elena", "Yuki", "Sara", "Clara",
                               "Nina", "Aisha", "Ingrid", "Mei", "Julia", "Zoe", "Lisa", "Hana", "Amara"} else "he")
            for n in FIRST_NAMES}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _calc(expr: str) -> float:
    """Value of an arithmetic expression of integers and ``+ - * /`` (usual precedence; nothing else)."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not plain arithmetic: {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _parts(n: int) -> list[int]:
    """Place-value parts of ``n``: 294 -> [200, 90, 4]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits) if d != "0"] or [0]


def _chain(a: int, op: str, parts: list[int]) -> list[str]:
    """``a op p1 op p2 ...``, folded one part at a time."""
    segs, run = [f"{a} {op} " + f" {op} ".join(map(str, parts))], a
    for i in range(len(parts) - 1):
        run = run + parts[i] if op == "+" else run - parts[i]
        segs.append(f"{run} {op} " + f" {op} ".join(map(str, parts[i + 1:])))
    return segs


def add_line(a: int, b: int) -> tuple[str, int]:
    """``a + b`` worked by adding ``b``'s place-value parts one at a time."""
    parts = _parts(b)
    segs = [f"{a} + {b}"] + (_chain(a, "+", parts) if len(parts) > 1 else [])
    return " = ".join(segs + [str(a + b)]), a + b


def sub_line(a: int, b: int) -> tuple[str, int]:
    """``a - b`` worked by subtracting ``b``'s place-value parts one at a time."""
    parts = _parts(b)
    segs = [f"{a} - {b}"] + (_chain(a, "-", parts) if len(parts) > 1 else [])
    return " = ".join(segs + [str(a - b)]), a - b


def mul_line(a: int, b: int) -> tuple[str, int]:
    """``a * b`` worked by splitting the operand with more place-value parts (the other is a
    times-table factor), then adding the partial products."""
    big, small = (a, b) if len(_parts(a)) >= len(_parts(b)) else (b, a)
    parts = _parts(big)
    if len(parts) == 1:
        return f"{a} * {b} = {a * b}", a * b
    products = [p * small for p in parts]
    segs = [f"{a} * {b}", " + ".join(f"{p} * {small}" for p in parts)]
    segs += _chain(products[0], "+", products[1:])[:1] if len(products) == 2 else _chain(products[0], "+", products[1:])
    return " = ".join(segs + [str(a * b)]), a * b


def div_line(a: int, b: int) -> tuple[str, int]:
    """``a / b`` for an exact division; a quotient past the times tables is split by place value
    (``201 / 3 = 180 / 3 + 21 / 3 = 60 + 7 = 67``)."""
    assert a % b == 0, (a, b)
    q = a // b
    parts = _parts(q)
    if q <= 12 or len(parts) == 1:
        return f"{a} / {b} = {q}", q
    segs = [f"{a} / {b}", " + ".join(f"{p * b} / {b}" for p in parts), " + ".join(map(str, parts))]
    return " = ".join(segs + [str(q)]), q


Lines = list[tuple[str, int]]


def _person(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(FIRST_NAMES)
    return name, _PRONOUN[name]


def _add(rng):
    n, p = _person(rng)
    a, b, item = rng.randint(5, 500), rng.randint(2, 300), rng.choice(_ITEMS)
    q = rng.choice((
        f"{n} has {a} {item}. {p.capitalize()} gets {b} more. How many {item} does {p} have now?",
        f"A shop had {a} {item} and received {b} more. How many {item} does it have?",
    ))
    return q, [add_line(a, b)]


def _sub(rng):
    n, p = _person(rng)
    a = rng.randint(10, 600)
    b, item = rng.randint(1, a - 1), rng.choice(_ITEMS)
    q = rng.choice((
        f"{n} has {a} {item} and gives {b} away. How many {item} are left?",
        f"There were {a} {item} in a box. {n} took out {b}. How many {item} remain in the box?",
    ))
    return q, [sub_line(a, b)]


def _mul(rng):
    a, b, item = rng.randint(2, 12), rng.randint(2, 60), rng.choice(_ITEMS)
    q = rng.choice((
        f"There are {a} boxes with {b} {item} each. How many {item} are there in total?",
        f"Each of {a} kids has {b} {item}. How many {item} do they have altogether?",
    ))
    return q, [mul_line(a, b)]


def _div(rng):
    b, each, item = rng.randint(2, 12), rng.randint(2, 12), rng.choice(_ITEMS)
    a = b * each
    q = rng.choice((
        f"{a} {item} are shared equally among {b} kids. How many {item} does each kid get?",
        f"A teacher puts {a} {item} into {b} equal piles. How many {item} are in each pile?",
    ))
    return q, [div_line(a, b)]


def _rate(rng):
    v, t = rng.randint(20, 120), rng.randint(2, 9)
    vehicle = rng.choice(("train", "car", "bus", "boat"))
    return f"A {vehicle} travels {v} km per hour for {t} hours. How far does it go in km?", [mul_line(v, t)]


def _change(rng):
    n, p = _person(rng)
    k, price = rng.randint(2, 9), rng.randint(2, 15)
    bill = rng.choice([b for b in (20, 50, 100) if b >= k * price] or [200])
    item = rng.choice(("notebooks", "pens", "tickets", "mugs", "plants"))
    q = f"{n} buys {k} {item} at ${price} each and pays with a ${bill} bill. How much change does {p} get?"
    return q, [mul_line(k, price), sub_line(bill, k * price)]


def _area(rng):
    l, w = rng.randint(3, 40), rng.randint(2, 12)
    return f"A rectangle is {l} m long and {w} m wide. What is its area in square meters?", [mul_line(l, w)]


def _packs(rng):
    n, p = _person(rng)
    a, b, c, item = rng.randint(2, 80), rng.randint(2, 9), rng.randint(2, 12), rng.choice(_ITEMS)
    q = f"{n} has {a} {item}. {p.capitalize()} buys {b} packs of {c} {item}. How many {item} does {p} have now?"
    return q, [mul_line(b, c), add_line(a, b * c)]


def _savings(rng):
    n, p = _person(rng)
    s, weeks = rng.randint(2, 12), rng.randint(2, 12)
    return f"{n} saves ${s} a week. How many weeks until {p} has ${s * weeks}?", [div_line(s * weeks, s)]


def _discount(rng):
    price, tens = 10 * rng.randint(2, 50), rng.randint(1, 5)
    item = rng.choice(("shirt", "lamp", "jacket", "game", "chair"))
    q = f"A {item} costs ${price} and is discounted by {10 * tens}%. What is the new price in dollars?"
    lines = [div_line(price, 10)]  # 10% of the price
    if tens > 1:
        lines.append(mul_line(price // 10, tens))
    return q, lines + [sub_line(price, price // 10 * tens)]


def _average(rng):
    a, b = rng.randint(40, 100), rng.randint(40, 100)
    c = rng.choice([x for x in range(40, 101) if (a + b + x) % 3 == 0])
    q = f"A student scored {a}, {b} and {c} on three tests. What is the average score?"
    return q, [add_line(a, b), add_line(a + b, c), div_line(a + b + c, 3)]


def _sold(rng):
    a = rng.randint(60, 400)
    b = rng.randint(5, a // 2)
    c = rng.randint(5, a - b - 1)
    q = f"A bakery baked {a} loaves. It sold {b} in the morning and {c} in the afternoon. How many loaves are left?"
    return q, [add_line(b, c), sub_line(a, b + c)]


def _bare(rng):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        return rng.choice((f"What is {a} times {b}?", f"Calculate {a} * {b}.")), [mul_line(a, b)]
    a, b = rng.randint(10, 999), rng.randint(1, 999)
    if op == "+":
        return rng.choice((f"What is {a} plus {b}?", f"Calculate {a} + {b}.")), [add_line(a, b)]
    a, b = max(a, b), min(a, b)
    return rng.choice((f"What is {a} minus {b}?", f"Calculate {a} - {b}.")), [sub_line(a, b)]


_KINDS: dict[str, Callable[[random.Random], tuple[str, Lines]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div, "rate": _rate, "change": _change, "area": _area,
    "packs": _packs, "savings": _savings, "discount": _discount, "average": _average, "sold": _sold, "bare": _bare,
}
KINDS = tuple(_KINDS)


def sample(rng: random.Random) -> dict:
    """One candidate row (without id/split)."""
    kind = rng.choice(KINDS)
    question, lines = _KINDS[kind](rng)
    for line, value in lines:  # every "=" of every worked line must be true arithmetic
        assert all(_calc(seg) == value for seg in line.split(" = ")), (line, value)
    answer = lines[-1][1]
    solution = "\n".join(line for line, _ in lines) + f"\nAnswer: {answer}"
    return {
        "messages": [{"role": "user", "content": question}],
        "reference": solution,
        "expected": {"answer": answer, "kind": kind},
    }


# --------------------------------------------------------------------------- checking

_ANSWER_RE = re.compile(r"Answer:\s*\**\s*\$?\s*(-?[\d,]*\.?\d+)", re.I)


def parse_answer(output: str) -> float | None:
    """The number on the last ``Answer:`` line, or ``None``."""
    found = _ANSWER_RE.findall(output)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def check(row: dict, output: str) -> bool:
    """Is the last ``Answer: N`` of ``output`` the expected number?"""
    got = parse_answer(output)
    return got is not None and abs(got - float(row["expected"]["answer"])) < 1e-6
