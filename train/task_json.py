"""Field extraction into JSON from templated, varied sentences, and its checker.

Each sample picks a record kind (person, product, event, ...) whose key set is fixed, draws
the values, writes them into one of several sentence templates, and asks for a JSON object
with those keys, named in the message in a fixed order. Some values are normalised on the
way out, as a real extraction spec would ask: dates become ``YYYY-MM-DD``, currencies become
ISO codes, ``$120k`` becomes ``120000``. The reference answer is ``json.dumps`` of the record.

Checking parses the first JSON object in the output (code fences and chatter around it are
allowed) and compares it with the expected record: the key set must be exactly the one
asked for; strings match after trimming, collapsing spaces and case-folding; numbers match
numerically, and a numeric string equals its number.

This module knows nothing about models, chat templates or training.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

from train.task_common import CITIES, FIRST_NAMES, LAST_NAMES, MONTHS, full_name

NAME = "json"

_PRODUCTS = ("kettle", "desk lamp", "backpack", "blender", "office chair", "monitor", "tent", "raincoat", "coffee grinder", "bicycle helmet")
_BRANDS = ("Acme", "Nordia", "Zento", "Orbit", "Kova", "Lumio", "Pella", "Tarn")
_CURRENCIES = (("USD", "{v} dollars", "${v}"), ("EUR", "{v} euros", "€{v}"), ("GBP", "{v} pounds", "£{v}"))
_EVENTS = ("PyCon", "DataFest", "the Jazz Night", "the Spring Fair", "the Film Week", "RustConf", "the Book Expo", "the Marathon")
_AIRLINES = ("BA", "LH", "AF", "KL", "IB", "AZ", "SK", "TP")
_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy")
_ROLES = ("data engineer", "nurse", "accountant", "designer", "teacher", "chef", "pilot", "web developer")
_COMPANIES = ("Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Soylent", "Wonka", "Stark")
_DOMAINS = ("example.com", "mail.org", "post.net", "inbox.io")


def _date(rng: random.Random) -> tuple[str, str]:
    """(ISO date, how a sentence writes it)."""
    y, m, d = rng.randint(2023, 2026), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{y:04d}-{m:02d}-{d:02d}"
    shown = rng.choice((f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}", iso))
    return iso, shown


def _person(rng: random.Random) -> tuple[dict, str]:
    name, age, city = full_name(rng), rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice((
        "{name}, {age}, lives in {city}.", "At {age}, {name} calls {city} home.",
        "{city} resident {name} is {age} years old.", "Meet {name}: {age} years old, based in {city}.",
        "{name} ({age}) moved to {city} last year.",
    )).format(name=name, age=age, city=city)
    return {"name": name, "age": age, "city": city}, text


def _product(rng: random.Random) -> tuple[dict, str]:
    product = f"{rng.choice(_BRANDS)} {rng.choice(_PRODUCTS)}"
    price = round(rng.randint(199, 49999) / 100, 2)
    code, words, symbol = rng.choice(_CURRENCIES)
    amount = rng.choice((words, symbol)).format(v=f"{price:.2f}")
    text = rng.choice((
        "The {p} costs {a}.", "You can buy the {p} for {a}.", "{a} is the price of the {p}.",
        "On sale today: the {p}, only {a}.",
    )).format(p=product, a=amount)
    return {"product": product, "price": price, "currency": code}, text


def _event(rng: random.Random) -> tuple[dict, str]:
    event, city = rng.choice(_EVENTS), rng.choice(CITIES)
    iso, shown = _date(rng)
    text = rng.choice((
        "{e} takes place in {c} on {d}.", "On {d}, {e} comes to {c}.", "Join us in {c} for {e} on {d}.",
        "{c} hosts {e} on {d}.",
    )).format(e=event, c=city, d=shown)
    if text[0].islower():
        text = text[0].upper() + text[1:]
    return {"event": event, "city": city, "date": iso}, text


def _flight(rng: random.Random) -> tuple[dict, str]:
    flight = f"{rng.choice(_AIRLINES)}{rng.randint(100, 9999)}"
    origin, destination = rng.sample(CITIES, 2)
    text = rng.choice((
        "Flight {f} from {o} to {d} is boarding.", "{f} departs {o} for {d} at noon.",
        "Your flight {f} leaves {o} and lands in {d}.", "We fly {o} to {d} on {f}.",
    )).format(f=flight, o=origin, d=destination)
    return {"flight": flight, "origin": origin, "destination": destination}, text


def _contact(rng: random.Random) -> tuple[dict, str]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    email = f"{first.lower()}.{last.lower()}@{rng.choice(_DOMAINS)}"
    phone = f"555-{rng.randint(0, 9999):04d}"
    text = rng.choice((
        "Reach {n} at {e} or call {p}.", "Contact: {n}, phone {p}, email {e}.",
        "You can email {n} at {e}; the phone number is {p}.", "{n} ({e}, {p}) will answer questions.",
    )).format(n=f"{first} {last}", e=email, p=phone)
    return {"name": f"{first} {last}", "email": email, "phone": phone}, text


def _order(rng: random.Random) -> tuple[dict, str]:
    order_id, customer, items = rng.randint(1000, 99999), full_name(rng), rng.randint(1, 12)
    iso, shown = _date(rng)
    text = rng.choice((
        "Order #{o} shipped to {c} on {d}, {i} items.", "{c} received order {o} ({i} items) on {d}.",
        "On {d} we sent {i} items to {c} under order number {o}.",
    )).format(o=order_id, c=customer, d=shown, i=items)
    return {"order_id": order_id, "customer": customer, "items": items, "date": iso}, text


def _weather(rng: random.Random) -> tuple[dict, str]:
    city, temp, cond = rng.choice(CITIES), rng.randint(-15, 40), rng.choice(_CONDITIONS)
    text = rng.choice((
        "It is {t} degrees and {c} in {city}.", "{city} today: {c}, {t} degrees.",
        "Expect a {c} day in {city} with {t} degrees.",
    )).format(t=temp, c=cond, city=city)
    return {"city": city, "temperature": temp, "condition": cond}, text


def _job(rng: random.Random) -> tuple[dict, str]:
    company, role, k = rng.choice(_COMPANIES), rng.choice(_ROLES), rng.randint(30, 200)
    text = rng.choice((
        "{co} hires a {r} for ${k}k.", "{co} is looking for a {r}; the salary is {s} dollars.",
        "Wanted at {co}: {r}, paying ${k}k a year.",
    )).format(co=company, r=role, k=k, s=f"{k * 1000:,}")
    return {"company": company, "role": role, "salary": k * 1000}, text


_KINDS: dict[str, Callable[[random.Random], tuple[dict, str]]] = {
    "person": _person, "product": _product, "event": _event, "flight": _flight,
    "contact": _contact, "order": _order, "weather": _weather, "job": _job,
}
KINDS = tuple(_KINDS)

_ASKS = (
    "Extract {keys} as JSON: {text}",
    "Return a JSON object with the keys {keys} for this text: {text}",
    "Turn this into JSON with keys {keys}. {text}",
    "From the sentence below, give me JSON with {keys}.\n{text}",
)


def _key_list(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + " and " + keys[-1]


def sample(rng: random.Random) -> dict:
    """One candidate row (without id/split)."""
    kind = rng.choice(KINDS)
    record, text = _KINDS[kind](rng)
    message = rng.choice(_ASKS).format(keys=_key_list(list(record)), text=text)
    return {
        "messages": [{"role": "user", "content": message}],
        "reference": json.dumps(record),
        "expected": {"fields": record, "kind": kind},
    }


# --------------------------------------------------------------------------- checking


def first_json_object(output: str) -> dict | None:
    """The first ``{...}`` in ``output`` that parses as a JSON object, or ``None``."""
    decoder = json.JSONDecoder()
    start = output.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(output, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = output.find("{", start + 1)
    return None


def _norm(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return round(float(v), 6)
    if isinstance(v, str):
        s = " ".join(v.split()).casefold()
        try:
            return round(float(s.replace(",", "")), 6)
        except ValueError:
            return s
    return v


def check(row: dict, output: str) -> bool:
    """Does the first JSON object of ``output`` hold exactly the expected fields and values?"""
    got = first_json_object(output)
    want = row["expected"]["fields"]
    if got is None or set(got) != set(want):
        return False
    return all(_norm(got[k]) == _norm(want[k]) for k in want)
