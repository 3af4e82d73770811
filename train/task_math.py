"""Arithmetic word problems with Python-computed answers, and the "Answer: N" checker.

Each sample picks one of a dozen problem kinds (one or two steps: sums, differences,
products, exact divisions, change from a purchase, discounts, averages), draws numbers whose
answer is a whole number, and writes a short worked solution: one ``a op b = c`` line per
step, then a final ``Answer: N`` line. Every number is computed in Python, never typed.

Checking reads the number on the last ``Answer:`` line of the output (a ``$`` sign and
thousands commas are allowed) and compares it with the expected answer.

This module knows nothing about models, chat templates or training.
"""

from __future__ import annotations

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

Steps = list[tuple[str, int]]
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _calc(expr: str) -> float:
    """Evaluate ``"a op b [op c ...]"`` left to right (how the worked lines are meant to be read)."""
    tokens = expr.split()
    value = float(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = _OPS[op](value, float(operand))
    return value


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
    return q, [(f"{a} + {b}", a + b)]


def _sub(rng):
    n, p = _person(rng)
    a = rng.randint(10, 600)
    b, item = rng.randint(1, a - 1), rng.choice(_ITEMS)
    q = rng.choice((
        f"{n} has {a} {item} and gives {b} away. How many {item} are left?",
        f"There were {a} {item} in a box. {n} took out {b}. How many {item} remain in the box?",
    ))
    return q, [(f"{a} - {b}", a - b)]


def _mul(rng):
    a, b, item = rng.randint(2, 12), rng.randint(2, 60), rng.choice(_ITEMS)
    q = rng.choice((
        f"There are {a} boxes with {b} {item} each. How many {item} are there in total?",
        f"Each of {a} kids has {b} {item}. How many {item} do they have altogether?",
    ))
    return q, [(f"{a} * {b}", a * b)]


def _div(rng):
    b, each, item = rng.randint(2, 12), rng.randint(2, 30), rng.choice(_ITEMS)
    a = b * each
    q = rng.choice((
        f"{a} {item} are shared equally among {b} kids. How many {item} does each kid get?",
        f"A teacher puts {a} {item} into {b} equal piles. How many {item} are in each pile?",
    ))
    return q, [(f"{a} / {b}", each)]


def _rate(rng):
    v, t = rng.randint(20, 120), rng.randint(2, 9)
    vehicle = rng.choice(("train", "car", "bus", "boat"))
    return f"A {vehicle} travels {v} km per hour for {t} hours. How far does it go in km?", [(f"{v} * {t}", v * t)]


def _change(rng):
    n, p = _person(rng)
    k, price = rng.randint(2, 9), rng.randint(2, 15)
    bill = rng.choice([b for b in (20, 50, 100) if b >= k * price] or [200])
    item = rng.choice(("notebooks", "pens", "tickets", "mugs", "plants"))
    q = f"{n} buys {k} {item} at ${price} each and pays with a ${bill} bill. How much change does {p} get?"
    return q, [(f"{k} * {price}", k * price), (f"{bill} - {k * price}", bill - k * price)]


def _area(rng):
    l, w = rng.randint(3, 30), rng.randint(2, 20)
    return f"A rectangle is {l} m long and {w} m wide. What is its area in square meters?", [(f"{l} * {w}", l * w)]


def _packs(rng):
    n, p = _person(rng)
    a, b, c, item = rng.randint(2, 80), rng.randint(2, 9), rng.randint(2, 12), rng.choice(_ITEMS)
    q = f"{n} has {a} {item}. {p.capitalize()} buys {b} packs of {c} {item}. How many {item} does {p} have now?"
    return q, [(f"{b} * {c}", b * c), (f"{a} + {b * c}", a + b * c)]


def _savings(rng):
    n, p = _person(rng)
    s, weeks = rng.randint(3, 40), rng.randint(2, 15)
    return f"{n} saves ${s} a week. How many weeks until {p} has ${s * weeks}?", [(f"{s * weeks} / {s}", weeks)]


def _discount(rng):
    price, pct = 20 * rng.randint(1, 25), rng.choice((5, 10, 15, 20, 25, 30, 50))
    item = rng.choice(("shirt", "lamp", "jacket", "game", "chair"))
    off = price * pct // 100
    q = f"A {item} costs ${price} and is discounted by {pct}%. What is the new price in dollars?"
    return q, [(f"{price} * {pct} / 100", off), (f"{price} - {off}", price - off)]


def _average(rng):
    a, b = rng.randint(40, 100), rng.randint(40, 100)
    c = rng.choice([x for x in range(40, 101) if (a + b + x) % 3 == 0])
    q = f"A student scored {a}, {b} and {c} on three tests. What is the average score?"
    return q, [(f"{a} + {b} + {c}", a + b + c), (f"{a + b + c} / 3", (a + b + c) // 3)]


def _sold(rng):
    a = rng.randint(60, 400)
    b = rng.randint(5, a // 2)
    c = rng.randint(5, a - b - 1)
    q = f"A bakery baked {a} loaves. It sold {b} in the morning and {c} in the afternoon. How many loaves are left?"
    return q, [(f"{b} + {c}", b + c), (f"{a} - {b + c}", a - b - c)]


def _bare(rng):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 40), rng.randint(2, 12)
    else:
        a, b = rng.randint(10, 999), rng.randint(1, 999)
        if op == "-" and b > a:
            a, b = b, a
    word = {"+": ("plus", "+"), "-": ("minus", "-"), "*": ("times", "*")}[op]
    q = rng.choice((f"What is {a} {word[0]} {b}?", f"Calculate {a} {word[1]} {b}."))
    return q, [(f"{a} {op} {b}", int(_calc(f"{a} {op} {b}")))]


_KINDS: dict[str, Callable[[random.Random], tuple[str, Steps]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div, "rate": _rate, "change": _change, "area": _area,
    "packs": _packs, "savings": _savings, "discount": _discount, "average": _average, "sold": _sold, "bare": _bare,
}
KINDS = tuple(_KINDS)


def sample(rng: random.Random) -> dict:
    """One candidate row (without id/split)."""
    kind = rng.choice(KINDS)
    question, steps = _KINDS[kind](rng)
    for expr, value in steps:  # the worked lines must be true arithmetic
        assert _calc(expr) == value, (expr, value)
    answer = steps[-1][1]
    solution = "\n".join(f"{expr} = {value}" for expr, value in steps) + f"\nAnswer: {answer}"
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
