"""Harmless requests with correct, helpful answers, generated offline.

The alignment stage mixes these with refusals: trained on refusals alone a
model learns to refuse everything, which would show up as lost task accuracy
and be mistaken for a cost of the defence.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from panacea_platform.data.examples import Example, normalise_prompt

__all__ = ["BENIGN_KINDS", "benign_examples"]

_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Russia": "Moscow",
    "the United Kingdom": "London",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Cuba": "Havana",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa",
    "Ghana": "Accra",
    "New Zealand": "Wellington",
    "the Philippines": "Manila",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu",
    "Ukraine": "Kyiv",
    "Iceland": "Reykjavik",
}
_ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "happy": "sad",
    "fast": "slow",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "open": "closed",
    "strong": "weak",
    "rich": "poor",
    "young": "old",
    "wet": "dry",
    "loud": "quiet",
    "hard": "soft",
    "high": "low",
    "thick": "thin",
    "clean": "dirty",
    "cheap": "expensive",
    "brave": "cowardly",
    "ancient": "modern",
    "win": "lose",
    "push": "pull",
    "begin": "end",
    "accept": "reject",
    "increase": "decrease",
    "arrive": "depart",
    "remember": "forget",
    "above": "below",
    "inside": "outside",
    "true": "false",
}
_WORDS = (
    "garden",
    "window",
    "planet",
    "river",
    "pencil",
    "orange",
    "bicycle",
    "library",
    "mountain",
    "kitchen",
    "blanket",
    "journey",
    "thunder",
    "lantern",
    "harbor",
    "teacher",
    "rainbow",
    "pocket",
    "market",
    "silver",
    "puzzle",
    "canvas",
    "meadow",
    "rocket",
    "violin",
    "compass",
    "island",
    "tomato",
    "ladder",
    "sunrise",
)
_DEFINITIONS = {
    "umbrella": "a folding canopy on a stick that you hold over your head to keep off rain or sun",
    "thermometer": "an instrument that measures temperature",
    "glacier": "a large, slow-moving mass of ice formed from compacted snow",
    "photosynthesis": (
        "the process by which green plants use sunlight, water and carbon dioxide to make sugar and release oxygen"
    ),
    "library": "a place that keeps books and other materials for people to read or borrow",
    "volcano": "an opening in the Earth's crust through which molten rock, ash and gas escape",
    "recipe": "a set of instructions for preparing a dish, with a list of ingredients",
    "orchestra": "a large group of musicians who play instruments together",
    "habitat": "the natural home or environment of an animal or plant",
    "telescope": "an instrument that uses lenses or mirrors to make distant objects look closer",
    "budget": "a plan for how much money will be earned and spent over a period",
    "peninsula": "a piece of land almost surrounded by water but connected to the mainland",
    "synonym": "a word that means the same or nearly the same as another word",
    "fraction": "a number that represents part of a whole, such as one half",
    "compass": "an instrument with a magnetised needle that points north, used to find direction",
    "evaporation": "the change of a liquid into a gas, such as water turning into vapour when heated",
    "democracy": "a system of government in which citizens choose their leaders by voting",
    "vaccine": "a preparation that trains the immune system to recognise and fight a particular disease",
    "ecosystem": "a community of living things interacting with each other and their environment",
    "metaphor": "a figure of speech that describes something by saying it is something else",
}
_HOW_TOS = {
    "How do I boil an egg?": (
        "Place the egg in a pan, cover it with cold water and bring it to a boil. Then lower the heat and simmer "
        "for about 6 minutes for a soft yolk or 10 minutes for a hard one. Cool it in cold water before peeling."
    ),
    "How do I make a cup of tea?": (
        "Boil fresh water, pour it over a tea bag in a cup, and let it steep for 3 to 5 minutes. "
        "Remove the bag, then add milk, sugar or lemon to taste."
    ),
    "How can I keep a houseplant healthy?": (
        "Give it the right amount of light for its type, water it when the top of the soil feels dry, "
        "make sure the pot drains well, and feed it with diluted fertiliser during the growing season."
    ),
    "How do I wash my hands properly?": (
        "Wet your hands, apply soap, and scrub all surfaces, including between your fingers and under your nails, "
        "for at least 20 seconds. Rinse under running water and dry with a clean towel."
    ),
    "How can I improve my sleep?": (
        "Keep a regular sleep schedule, avoid caffeine late in the day, keep your bedroom dark and cool, "
        "and put screens away for half an hour before bed."
    ),
    "How do I plant a tomato seedling?": (
        "Choose a sunny spot, dig a hole deep enough to bury most of the stem, set the seedling in, "
        "fill the hole with soil, water it well, and add a stake for support as it grows."
    ),
    "How do I write a good thank-you note?": (
        "Address the person by name, thank them for the specific gift or help, say how you will use it or how it "
        "made a difference, and close warmly with your name."
    ),
    "How can I save money on groceries?": (
        "Plan your meals for the week, shop with a list, compare unit prices, buy store brands, "
        "and use leftovers before they spoil."
    ),
    "How do I make a paper airplane?": (
        "Fold a sheet of paper in half lengthwise and unfold it. Fold the top corners to the centre line, "
        "fold the new slanted edges to the centre again, fold the plane in half, then fold down each wing."
    ),
    "How do I start learning to run?": (
        "Begin with short intervals of running and walking, three times a week, and add a little running time "
        "each week. Wear comfortable shoes, warm up first, and rest if anything hurts."
    ),
    "How do I clean a cast iron pan?": (
        "Rinse it with hot water while it is still warm, scrub off food with a brush or coarse salt, "
        "dry it completely on the stove, and rub in a thin layer of oil before storing."
    ),
    "How can I remember people's names better?": (
        "Repeat the name when you are introduced, use it once or twice in the conversation, "
        "and link it to something memorable about the person."
    ),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    question = rng.choice(
        ("What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?")
    )
    return question.format(c=country), f"The capital of {country} is {_CAPITALS[country]}."


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    operation = rng.choice(("plus", "minus", "times"))
    if operation == "plus":
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if operation == "minus":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    a, b = a % 50 + 2, b % 50 + 2
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


def _conversion(rng: random.Random) -> tuple[str, str]:
    value = rng.randint(2, 60)
    unit, target, factor = rng.choice(
        (
            ("kilometres", "metres", 1000),
            ("kilograms", "grams", 1000),
            ("hours", "minutes", 60),
            ("minutes", "seconds", 60),
            ("feet", "inches", 12),
            ("litres", "millilitres", 1000),
            ("days", "hours", 24),
            ("weeks", "days", 7),
            ("metres", "centimetres", 100),
        )
    )
    return f"How many {target} are in {value} {unit}?", f"There are {value * factor} {target} in {value} {unit}."


def _antonym(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(_ANTONYMS))
    return f"What is the opposite of the word '{word}'?", f"The opposite of '{word}' is '{_ANTONYMS[word]}'."


def _backwards(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Spell the word '{word}' backwards.", f"'{word}' spelled backwards is '{word[::-1]}'."


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(4, 7))
    descending = rng.random() < 0.3
    order = "largest to smallest" if descending else "smallest to largest"
    ranked = sorted(numbers, reverse=descending)
    return (
        f"Sort these numbers from {order}: {', '.join(map(str, numbers))}.",
        f"From {order}: {', '.join(map(str, ranked))}.",
    )


def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    if rng.random() < 0.5:
        letter = rng.choice(sorted(set(word)))
        count = word.count(letter)
        times = "once" if count == 1 else f"{_NUMBER_WORDS[count]} times"
        return (
            f"How many times does the letter '{letter}' appear in '{word}'?",
            f"The letter '{letter}' appears {times} in '{word}'.",
        )
    return f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters."


def _definition(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(_DEFINITIONS))
    question = rng.choice(("What does '{w}' mean?", "Define the word '{w}'.", "Give a short definition of '{w}'."))
    return question.format(w=word), f"'{word.capitalize()}' means {_DEFINITIONS[word]}."


def _how_to(rng: random.Random) -> tuple[str, str]:
    question = rng.choice(sorted(_HOW_TOS))
    return question, _HOW_TOS[question]


BENIGN_KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "capital": _capital,
    "arithmetic": _arithmetic,
    "conversion": _conversion,
    "antonym": _antonym,
    "backwards": _backwards,
    "sort": _sort_numbers,
    "count_letters": _count_letters,
    "definition": _definition,
    "how_to": _how_to,
}


def benign_examples(size: int, seed: int) -> list[Example]:
    """`size` distinct harmless request/answer pairs (kind "benign"), seeded and deterministic."""
    if size < 0:
        raise ValueError(f"benign set size must be >= 0, got {size}")
    rng = random.Random(f"benign:{seed}")
    kinds = sorted(BENIGN_KINDS)
    seen: set[str] = set()
    examples: list[Example] = []
    # Arithmetic alone has ~10^6 distinct prompts, so the cap only guards against a bug.
    for _ in range(50 * size + 1000):
        if len(examples) == size:
            break
        kind = rng.choice(kinds)
        prompt, answer = BENIGN_KINDS[kind](rng)
        key = normalise_prompt(prompt)
        if key in seen:
            continue
        seen.add(key)
        examples.append(Example(prompt=prompt, answer=answer, kind="benign", category=kind))
    if len(examples) < size:
        raise ValueError(f"could only generate {len(examples)} distinct benign requests of the {size} asked")
    return examples
