"""Shared pieces of the task generators: the train/test split rule and small word lists.

The split is decided by a hash of the task name and the user message, never by the seed or
by position in a stream: a message is either a test message or a training message, for every
seed and every size. So no training stream can ever contain a held-out prompt, which is what
``train.tasks.generate`` asserts and ``tests/train`` checks.

This module knows nothing about any particular task.
"""

from __future__ import annotations

import hashlib

# About one message in five is held out. The generators' spaces are large enough that both
# sides hold thousands of distinct messages.
TEST_PERCENT = 20
SPLITS = ("train", "test")


def split_of(task: str, text: str) -> str:
    """Which split a user message belongs to: ``"test"`` or ``"train"`` (stable across runs)."""
    digest = hashlib.sha1(f"{task}\x00{text}".encode("utf-8")).hexdigest()
    return "test" if int(digest[:8], 16) % 100 < TEST_PERCENT else "train"


FIRST_NAMES = (
    "Maria", "Tom", "Anna", "Ken", "Priya", "Lucas", "Sofia", "Omar", "Emma", "Noah", "Lena", "Ravi",
    "Chen", "Fatima", "Jonas", "Elena", "Diego", "Yuki", "Sara", "Ahmed", "Clara", "Mateo", "Nina",
    "Leo", "Aisha", "Pablo", "Ingrid", "Hugo", "Mei", "Kofi", "Julia", "Ivan", "Zoe", "Sam", "Lisa",
    "Marco", "Hana", "Felix", "Amara", "Oscar",
)
LAST_NAMES = (
    "Lopez", "Berg", "Ito", "Shah", "Silva", "Rossi", "Khan", "Novak", "Meyer", "Kim", "Garcia",
    "Nguyen", "Larsen", "Costa", "Weber", "Haddad", "Sato", "Dubois", "Okafor", "Jensen", "Moreau",
    "Fischer", "Patel", "Romero", "Adler", "Brandt", "Tanaka", "Kowalski", "Mensah", "Vega",
)
CITIES = (
    "Madrid", "Lisbon", "Berlin", "Paris", "Rome", "Oslo", "Vienna", "Prague", "Dublin", "Athens",
    "Warsaw", "Zurich", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Austin", "Sydney",
    "Tokyo", "Osaka", "Seoul", "Nairobi", "Lagos", "Cairo", "Lima", "Bogota", "Mumbai", "Delhi",
    "Manila",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)


def full_name(rng) -> str:
    """A random "First Last" name."""
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
