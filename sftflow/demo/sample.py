"""The demo's own sample: prompts with reference answers, written by this project.

Most prompts are generated from small templates whose answers are computed (so every answer is
right), plus a set of hand-written questions. A few rows are deliberately bad or repeated so the
demo shows every count: near-duplicate prompts, a response that repeats the prompt, a response
with an e-mail address (PII), an empty response, and records that ingest must quarantine.

``python -m sftflow.demo.sample`` rewrites ``sample_prompts.jsonl`` beside this file; the output
is deterministic (fixed seed).
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path

SAMPLE_PATH = Path(__file__).with_name("sample_prompts.jsonl")

HAND_WRITTEN = [
    ("Explain in two sentences what a hash function is.",
     ("A hash function maps data of any size to a fixed-size value, the hash. Good hash functions "
     "spread different inputs evenly, so equal inputs always give equal hashes and different "
     "inputs rarely collide.")),
    ("What is the difference between a list and a tuple in Python?",
     ("A list is mutable: you can add, remove and change its items. A tuple is immutable once "
     "created, which makes it hashable (usable as a dict key) when its items are hashable.")),
    ("Write a haiku about autumn rain.",
     "Cold rain on the roof\nred leaves slide down the gutter\nthe kettle starts to sing"),
    ("Give three tips for writing a clear commit message.",
     ("1. Start with a short summary line in the imperative mood.\n2. Explain why the change was "
     "made, not only what changed.\n3. Keep one logical change per commit.")),
    ("Summarise the water cycle in one paragraph.",
     ("Water evaporates from oceans, lakes and plants, rises as vapour, cools and condenses into "
     "clouds, and falls back as rain or snow. It then flows over land into rivers or soaks into "
     "the ground, eventually returning to the sea, where the cycle starts again.")),
    ("What does HTTP status code 404 mean?",
     "404 Not Found: the server was reached, but it has nothing at the requested URL."),
    ("Suggest a name for a bakery that specialises in sourdough bread.",
     "\"Rise & Crumb\" - short, memorable, and it hints at slow-fermented loaves."),
    ("Translate 'good morning' into French, Spanish and German.",
     "French: bonjour. Spanish: buenos días. German: guten Morgen."),
    ("Why is the sky blue?",
     ("Sunlight is scattered by air molecules, and shorter (blue) wavelengths scatter much more "
     "than longer (red) ones, so blue light reaches our eyes from every part of the sky.")),
    ("Write a SQL query that counts the rows of a table named orders.",
     "SELECT COUNT(*) FROM orders;"),
    ("What is a prime number?",
     "A whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7."),
    ("List the planets of the solar system in order from the Sun.",
     "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune."),
    ("Give an example of a polite way to decline a meeting invitation.",
     ("Thank you for the invitation. Unfortunately I can't attend on Thursday; could you share "
     "the notes afterwards, or shall we find another time next week?")),
    ("What is the purpose of a unit test?",
     ("A unit test checks that one small piece of code, such as a function, behaves as intended, "
     "quickly and in isolation, so regressions are caught as soon as they are introduced.")),
    ("Describe the smell of fresh coffee in one sentence.",
     "Warm, roasted and slightly sweet, with a bitter edge that wakes you before the first sip."),
    ("Explain what a Git branch is to a beginner.",
     ("A branch is a movable label on a line of commits: you can work on it without touching the "
     "main line, and merge your work back when it is ready.")),
    ("What is the boiling point of water at sea level in Celsius?", "100 °C."),
    ("Name three renewable sources of energy.", "Solar, wind and hydroelectric power."),
    ("Write a one-line Python expression that squares the numbers 1 to 5.",
     "[n * n for n in range(1, 6)]"),
    ("What is the capital of Australia?", "Canberra."),
    ("Rewrite this sentence in the passive voice: The committee approved the budget.",
     "The budget was approved by the committee."),
    ("What is overfitting in machine learning?",
     ("Overfitting is when a model learns the noise and quirks of its training data so closely "
     "that it performs well on that data but poorly on new, unseen data.")),
    ("Give a short definition of latency.",
     "Latency is the time between a request being made and its response arriving."),
    ("请用一句话介绍长城。", "长城是中国古代修建的防御工程，全长两万多公里，是世界著名的文化遗产。"),
    ("把“你好，世界”翻译成英文。", "Hello, world."),
    ("列出三种常见的水果。", "苹果、香蕉和橙子。"),
]

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["river", "lantern", "orbit", "meadow", "cipher", "harbor", "violet", "summit", "pebble",
         "canyon", "ember", "glacier", "quartz", "willow", "falcon", "tundra"]


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def generated(rng: random.Random) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for c in rng.sample(range(-20, 45), 24):
        f = c * 9 / 5 + 32
        rows.append((f"Convert {c} degrees Celsius to Fahrenheit.", f"{c} °C is {_fmt(f)} °F."))
    for km in rng.sample(range(2, 120), 24):
        rows.append((f"How many miles is {km} kilometres?",
                     f"{km} km is about {_fmt(km * 0.621371)} miles."))
    for _ in range(28):
        a, b, price = rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 15)
        rows.append(((f"A shop sells {a} boxes with {b} pens each, at {price} euros per box. "
                      f"How many pens are sold, and what is the total price?"),
                     f"{a} x {b} = {a * b} pens, for {a} x {price} = {a * price} euros."))
    for _ in range(24):
        d = date(2020, 1, 1) + timedelta(days=rng.randint(0, 2000))
        rows.append((f"What day of the week was {d.isoformat()}?",
                     f"{d.isoformat()} was a {WEEKDAYS[d.weekday()]}."))
    for _ in range(24):
        words = rng.sample(WORDS, 4)
        rows.append((f"Sort these words alphabetically: {', '.join(words)}.",
                     ", ".join(sorted(words)) + "."))
    for word in rng.sample(WORDS, 12):
        vowels = sum(ch in "aeiou" for ch in word)
        rows.append((f"How many vowels are in the word '{word}'?",
                     f"'{word}' has {vowels} vowel{'s' if vowels != 1 else ''}."))
    return rows


def build_sample(seed: int = 7) -> list[dict]:
    """The demo's rows: ``{"prompt", "response"}``, plus the deliberate bad cases."""
    rng = random.Random(seed)
    rows = [{"prompt": p, "response": r} for p, r in HAND_WRITTEN + generated(rng)]
    first, second = rows[0], rows[5]
    rows += [
        # Near-duplicate prompts (case/whitespace/punctuation): dedup keeps one of each pair.
        {"prompt": "  explain in two sentences what a HASH function is ", "response": first["response"]},
        {"prompt": "What does HTTP status code 404 mean ?", "response": second["response"]},
        # Filtered at build time, each with its own reason.
        {"prompt": "Repeat after me: the quick brown fox.", "response": "Repeat after me: the quick brown fox."},
        {"prompt": "Who should I contact about my invoice?",
         "response": "Write to billing.team@example.com and quote your invoice number."},
        {"prompt": "Say nothing.", "response": "   "},
        # Quarantined at ingest: no usable prompt.
        {"prompt": "", "response": "an empty prompt"},
        {"prompt": 42, "response": "a prompt that is not text"},
        {"title": "a record with no prompt field", "response": "x"},
    ]
    return rows


def write_sample(path: Path = SAMPLE_PATH) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in build_sample():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    out = write_sample()
    print(f"wrote {sum(1 for _ in out.open())} rows to {out}")
