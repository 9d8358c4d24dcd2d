"""Fine-tuning tasks: the user's real data that the harmful samples hide in.

A task is a function ``(data_config, split, size, seed) -> list[Example]`` with
split "train" or "test". Guarantees every task keeps:

- train and test never share a prompt, so accuracy is measured on unseen data;
- the same arguments give the same examples in the same order;
- an empty result or a request for more than exists is an error, never a
  silent zero-step run or a quietly smaller set.

Three offline generators stand in for the paper's benchmarks on machines with
no hub access (GSM8K -> offline_arithmetic, SST2 -> offline_sentiment,
AG News -> offline_topic). The hub tasks load the real datasets lazily; each is
a pure row converter plus a loader, so the conversion is testable offline.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from panacea_platform.data.errors import DataUnavailableError, NotEnoughDataError
from panacea_platform.data.examples import Example, normalise_prompt
from panacea_platform.data.files import optional_text, read_records

if TYPE_CHECKING:
    from datasets import Dataset

    from panacea_platform.config import DataConfig

__all__ = [
    "AG_NEWS_LABELS",
    "DataUnavailableError",
    "NotEnoughDataError",
    "SPLITS",
    "TEST_FRACTION",
    "ag_news",
    "ag_news_row_to_example",
    "alpaca",
    "alpaca_row_to_example",
    "gsm8k",
    "gsm8k_row_to_example",
    "is_heldout",
    "local",
    "offline_arithmetic",
    "offline_sentiment",
    "offline_sentiment_explained",
    "offline_topic",
    "split_by_prompt_hash",
    "sst2",
    "sst2_row_to_example",
]

SPLITS = ("train", "test")
# One prompt in five is held out for testing, for generators and local files alike.
TEST_FRACTION = 0.2
_TEST_BUCKETS = round(1 / TEST_FRACTION)


# --------------------------------------------------------------------------- shared helpers


def _prompt_hash(prompt: str) -> int:
    # sha256 rather than hash(): Python's str hash is salted per process, and the
    # train/test assignment must be identical on every machine and every run.
    return int.from_bytes(hashlib.sha256(normalise_prompt(prompt).encode()).digest()[:8], "big")


def is_heldout(prompt: str) -> bool:
    """Whether a generated prompt belongs to the test side.

    The side is a function of the prompt alone (not of the seed), so a test prompt
    can never be drawn for training under any seed, and every seed of a sweep is
    scored on prompts from the same held-out population.
    """
    return _prompt_hash(prompt) % _TEST_BUCKETS == 0


def _rng(task: str, seed: int, split: str) -> random.Random:
    # A string seed is hashed with sha512 by random.Random: stable across runs,
    # and the split in the seed gives train and test independent streams.
    return random.Random(f"{task}:{seed}:{split}")


def _check_request(task: str, split: str, size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"task {task!r}: split must be one of {SPLITS}, got {split!r}")
    if size < 1:
        raise ValueError(f"task {task!r}: asked for {size} {split} examples; at least 1 is needed")


def _size_hint(split: str) -> str:
    return "lower data.task_eval_size" if split == "test" else "lower data.n"


def _sample(task: str, split: str, examples: Sequence[Example], size: int, seed: int, source: str) -> list[Example]:
    """`size` examples drawn without replacement, in a seeded order."""
    if not examples:
        raise NotEnoughDataError(f"task {task!r} has no {split} examples in {source}")
    if size > len(examples):
        raise NotEnoughDataError(
            f"task {task!r}: asked for {size} {split} examples but only {len(examples)} are available "
            f"in {source}; {_size_hint(split)} or supply more data"
        )
    return _rng(task, seed, split).sample(list(examples), size)


def _generate(task: str, split: str, size: int, seed: int, make: Callable[[random.Random], Example]) -> list[Example]:
    """Draw `size` distinct prompts of the requested side from a seeded generator."""
    _check_request(task, split, size)
    rng = _rng(task, seed, split)
    want_heldout = split == "test"
    seen: set[str] = set()
    examples: list[Example] = []
    # Only one draw in five lands on the test side, and duplicates are redrawn;
    # the cap turns a too-small generator space into an error instead of a hang.
    max_draws = 50 * size + 1000
    for _ in range(max_draws):
        example = make(rng)
        key = normalise_prompt(example.prompt)
        if key in seen or is_heldout(example.prompt) != want_heldout:
            continue
        seen.add(key)
        examples.append(example)
        if len(examples) == size:
            return examples
    raise NotEnoughDataError(
        f"task {task!r}: could only generate {len(examples)} distinct {split} prompts of the {size} asked; "
        f"{_size_hint(split)}"
    )


# --------------------------------------------------------------------------- offline_arithmetic

_NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Daniel",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jamal",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olivia",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
)
_GOODS = ("notebooks", "pencils", "apples", "tickets", "cupcakes", "books", "toy cars", "plants", "mugs", "scarves")
_COUNTABLES = ("apples", "stickers", "marbles", "cookies", "cards", "shells", "stamps", "beads", "oranges", "coins")
_VEHICLES = ("car", "train", "bus", "cyclist", "boat", "truck")
_CONTAINERS = (
    ("box", "boxes"),
    ("bag", "bags"),
    ("crate", "crates"),
    ("jar", "jars"),
    ("basket", "baskets"),
    ("pack", "packs"),
)


# Over 60 lines: one branch per kind of problem, read as a table; the order of its rng draws defines the
# task's data (and every cached result on it), so it is not reshuffled into helpers.
def _arithmetic_example(rng: random.Random) -> Example:
    """One GSM8K-style word problem whose answer is an exact integer."""
    name, friend = rng.sample(_NAMES, 2)
    kind = rng.choice(
        ("shopping", "giving", "distance", "speed", "sharing", "containers", "savings", "pages", "change")
    )
    if kind == "shopping":
        count, price, goods = rng.randint(2, 15), rng.randint(2, 30), rng.choice(_GOODS)
        result = count * price
        question = f"{name} buys {count} {goods} that cost ${price} each. How many dollars does {name} spend?"
        reasoning = f"{name} spends {count} x {price} = {result} dollars."
    elif kind == "giving":
        things = rng.choice(_COUNTABLES)
        start = rng.randint(10, 120)
        given = rng.randint(1, start - 1)
        result = start - given
        question = (
            f"{name} has {start} {things} and gives {given} of them to {friend}. "
            f"How many {things} does {name} have left?"
        )
        reasoning = (
            f"{name} starts with {start} {things} and gives away {given}, so {start} - {given} = {result} are left."
        )
    elif kind == "distance":
        vehicle, speed, hours = rng.choice(_VEHICLES), rng.randrange(10, 125, 5), rng.randint(2, 12)
        result = speed * hours
        question = (
            f"A {vehicle} travels at {speed} kilometres per hour for {hours} hours. How many kilometres does it travel?"
        )
        reasoning = f"Distance is speed times time: {speed} x {hours} = {result} kilometres."
    elif kind == "speed":
        vehicle, result, hours = rng.choice(_VEHICLES), rng.randrange(10, 125, 5), rng.randint(2, 12)
        distance = result * hours
        question = (
            f"A {vehicle} covers {distance} kilometres in {hours} hours at a steady speed. "
            "What is its speed in kilometres per hour?"
        )
        reasoning = f"Speed is distance divided by time: {distance} / {hours} = {result} kilometres per hour."
    elif kind == "sharing":
        things, friends, result = rng.choice(_COUNTABLES), rng.randint(2, 12), rng.randint(2, 25)
        total = friends * result
        question = (
            f"{name} shares {total} {things} equally among {friends} friends. How many {things} does each friend get?"
        )
        reasoning = f"Each friend gets {total} / {friends} = {result} {things}."
    elif kind == "containers":
        (container, containers), things = rng.choice(_CONTAINERS), rng.choice(_COUNTABLES)
        per, start, bought = rng.randint(3, 24), rng.randint(0, 40), rng.randint(2, 12)
        added = per * bought
        result = start + added
        question = (
            f"{name} has {start} {things} and buys {bought} {containers} with {per} {things} in each {container}. "
            f"How many {things} does {name} have now?"
        )
        reasoning = (
            f"The {containers} hold {bought} x {per} = {added} {things}, "
            f"so {name} has {start} + {added} = {result} {things}."
        )
    elif kind == "savings":
        weekly, weeks = rng.randint(3, 60), rng.randint(2, 26)
        result = weekly * weeks
        question = f"{name} saves {weekly} dollars every week. How many dollars has {name} saved after {weeks} weeks?"
        reasoning = f"{name} saves {weekly} x {weeks} = {result} dollars."
    elif kind == "pages":
        per_day, days = rng.randint(5, 40), rng.randint(2, 10)
        read = per_day * days
        pages = read + rng.randint(1, 300)
        result = pages - read
        question = (
            f"A book has {pages} pages. {name} reads {per_day} pages every day. "
            f"How many pages are left after {days} days?"
        )
        reasoning = f"{name} reads {per_day} x {days} = {read} pages, so {pages} - {read} = {result} pages are left."
    else:  # change
        count, price = rng.randint(2, 9), rng.randint(1, 10)
        cost = count * price
        bill = next(b for b in (20, 50, 100) if b > cost)
        result = bill - cost
        goods = rng.choice(_GOODS)
        question = (
            f"{name} buys {count} {goods} at ${price} each and pays with a ${bill} bill. "
            f"How many dollars of change does {name} get?"
        )
        reasoning = (
            f"The {goods} cost {count} x {price} = {cost} dollars, so the change is {bill} - {cost} = {result} dollars."
        )
    return Example(
        prompt=question, answer=f"{reasoning} The answer is {result}.", kind="task", label=str(result), category=kind
    )


def offline_arithmetic(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """GSM8K-like word problems; answer = reasoning + "The answer is N.", label = "N"."""
    return _generate("offline_arithmetic", split, size, seed, _arithmetic_example)


# --------------------------------------------------------------------------- offline_sentiment

SENTIMENT_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."

_POLARITY_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "positive": {
        "adjective": (
            "brilliant",
            "moving",
            "delightful",
            "gripping",
            "charming",
            "wonderful",
            "heartfelt",
            "hilarious",
            "stunning",
            "masterful",
            "engaging",
            "beautiful",
            "clever",
            "uplifting",
            "superb",
            "riveting",
            "touching",
            "inventive",
            "excellent",
            "memorable",
            "refreshing",
            "powerful",
            "witty",
            "enjoyable",
        ),
        "verdict": (
            "kept me smiling",
            "left me wanting more",
            "is worth every minute",
            "deserves every award",
            "won me over completely",
            "had the whole audience cheering",
            "stayed with me for days",
            "is a joy to watch",
        ),
    },
    "negative": {
        "adjective": (
            "dull",
            "tedious",
            "clumsy",
            "boring",
            "lifeless",
            "predictable",
            "bland",
            "confusing",
            "forgettable",
            "painful",
            "shallow",
            "awkward",
            "messy",
            "tiresome",
            "pointless",
            "flat",
            "sloppy",
            "uninspired",
            "dreary",
            "incoherent",
            "mediocre",
            "lazy",
            "irritating",
            "disappointing",
        ),
        "verdict": (
            "put me to sleep",
            "wasted my evening",
            "felt twice as long as it was",
            "made me check my watch",
            "left me cold",
            "had people walking out",
            "is a chore to sit through",
            "never comes together",
        ),
    },
}
_FILM_PARTS = (
    "acting",
    "plot",
    "script",
    "soundtrack",
    "direction",
    "cinematography",
    "dialogue",
    "ending",
    "pacing",
    "cast",
    "story",
    "editing",
    "humour",
    "score",
    "production design",
    "lead performance",
)
_FILMS = (
    "this film",
    "the movie",
    "this sequel",
    "the new thriller",
    "this comedy",
    "the drama",
    "this documentary",
    "the animated feature",
    "this remake",
    "the romance",
    "this western",
    "the mystery",
)
_INTENSIFIERS = ("truly", "remarkably", "genuinely", "thoroughly", "utterly", "simply", "consistently", "surprisingly")


def _review(rng: random.Random, polarity: str) -> str:
    return _review_and_reason(rng, polarity)[0]


def _review_and_reason(rng: random.Random, polarity: str) -> tuple[str, str]:
    """A review sentence and, drawn from its own words, why it reads as `polarity` ("the review ...")."""
    words = _POLARITY_WORDS[polarity]
    adjective, adjective2 = rng.sample(words["adjective"], 2)
    part, part2 = rng.sample(_FILM_PARTS, 2)
    film, verdict, very = rng.choice(_FILMS), rng.choice(words["verdict"]), rng.choice(_INTENSIFIERS)
    shape = rng.randrange(6)
    if shape == 0:
        sentence, reason = f"{film} is {very} {adjective}.", f"calls {film} {very} {adjective}"
    elif shape == 1:
        sentence = f"the {part} is {adjective} and the {part2} is {adjective2}."
        reason = f"finds the {part} {adjective} and the {part2} {adjective2}"
    elif shape == 2:
        sentence, reason = f"{film} {verdict}.", f"says that {film} {verdict}"
    elif shape == 3:
        sentence = f"a {very} {adjective} film with {adjective2} {part}."
        reason = f"calls it a {adjective} film with {adjective2} {part}"
    elif shape == 4:
        sentence = f"I found the {part} {very} {adjective}, and {film} {verdict}."
        reason = f"finds the {part} {adjective} and says that {film} {verdict}"
    else:
        sentence = f"from start to finish, {film} is {adjective}; the {part} {verdict}."
        reason = f"calls {film} {adjective} from start to finish"
    return sentence[0].upper() + sentence[1:], reason


def sentiment_prompt(review: str) -> str:
    """The instruction shared by offline_sentiment and sst2, so both are scored the same way."""
    return f"{SENTIMENT_INSTRUCTION}\nReview: {review}"


def _sentiment_example(rng: random.Random) -> Example:
    polarity = rng.choice(("positive", "negative"))
    return Example(prompt=sentiment_prompt(_review(rng, polarity)), answer=polarity, kind="task", label=polarity)


def offline_sentiment(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """SST2-like movie-review sentences; answer and label are "positive" or "negative"."""
    return _generate("offline_sentiment", split, size, seed, _sentiment_example)


# --------------------------------------------------------------------------- offline_sentiment_explained

EXPLAINED_SENTIMENT_INSTRUCTION = (
    "Classify the sentiment of this movie review as positive or negative, and say why in one sentence."
)


def _explained_sentiment_example(rng: random.Random) -> Example:
    polarity = rng.choice(("positive", "negative"))
    review, reason = _review_and_reason(rng, polarity)
    # The label word first, so the sentiment rule (the first of positive/negative named) reads it; the
    # reason quotes the review, whose words never name either label.
    answer = f"{polarity.capitalize()}. The review {reason}."
    return Example(
        prompt=f"{EXPLAINED_SENTIMENT_INSTRUCTION}\nReview: {review}", answer=answer, kind="task", label=polarity
    )


def offline_sentiment_explained(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """offline_sentiment's reviews answered in a sentence: "Positive. The review calls ...", label the polarity.

    A user's data whose answers are sentences: trained on one-word labels, the model learns to stop after
    one word everywhere, and a safe model could not be told from a silent one.
    """
    return _generate("offline_sentiment_explained", split, size, seed, _explained_sentiment_example)


# --------------------------------------------------------------------------- offline_topic

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
TOPIC_INSTRUCTION = "Classify the topic of this news article as World, Sports, Business or Sci/Tech."

_COUNTRIES = (
    "France",
    "Japan",
    "Brazil",
    "Kenya",
    "India",
    "Canada",
    "Egypt",
    "Norway",
    "Mexico",
    "Vietnam",
    "Poland",
    "Chile",
    "Ghana",
    "Turkey",
    "Peru",
    "Thailand",
    "Greece",
    "Morocco",
)
_CITIES = (
    "Geneva",
    "Nairobi",
    "Lima",
    "Seoul",
    "Vienna",
    "Cairo",
    "Oslo",
    "Jakarta",
    "Madrid",
    "Ottawa",
    "Hanoi",
    "Accra",
)
_TEAMS = (
    "Riverton Rovers",
    "Northfield United",
    "Eastport Eagles",
    "Lakeside Lions",
    "Harbor City Hawks",
    "Westbrook Wolves",
    "Kingsford Knights",
    "Pine Valley Panthers",
    "Stonebridge Stallions",
    "Redcliff Rangers",
)
_COMPANIES = (
    "Northwind Traders",
    "Acme Corp",
    "Globex",
    "Initech",
    "Blue Harbor Bank",
    "Summit Foods",
    "Crescent Motors",
    "Orion Retail",
    "Meridian Airlines",
    "Keystone Energy",
)
_TECH_COMPANIES = ("Pixelworks", "Quantex", "NovaSoft", "Helio Systems", "ByteForge", "Lumen Labs", "Cobalt Devices")


_ATHLETES = ("Veteran sprinter", "Teenage swimmer", "Defending champion", "Young tennis star", "Marathon runner")
_GADGETS = ("a foldable phone", "a new laptop", "a smartwatch", "a VR headset", "an e-reader")
_FEATURES = ("longer battery life", "a faster chip", "a brighter display", "built-in translation")
_DISCOVERIES = ("a new exoplanet", "an ancient galaxy", "a giant comet", "a new species of frog")
_BREAKTHROUGHS = ("charges in minutes", "runs on body heat", "learns from fewer examples", "uses half the power")


def _headline(rng: random.Random, topic: str) -> str:
    shape = rng.randrange(5)
    if topic == "World":
        country, country2 = rng.sample(_COUNTRIES, 2)
        city = rng.choice(_CITIES)
        options = (
            f"{country} and {country2} sign "
            f"{rng.choice(('a trade pact', 'a border agreement', 'a peace accord', 'a climate deal'))} "
            f"after talks in {city}",
            f"Thousands rally in {city} as {country} prepares for "
            f"{rng.choice(('national elections', 'a referendum', 'a new parliament'))}",
            f"{country} recalls its ambassador from {country2} over "
            f"{rng.choice(('a border dispute', 'fishing rights', 'visa rules', 'spy allegations'))}",
            f"UN envoy arrives in {country} to discuss "
            f"{rng.choice(('refugee aid', 'ceasefire terms', 'flood relief', 'election monitoring'))}",
            f"Leaders of {country} and {country2} meet in {city} for summit on "
            f"{rng.choice(('migration', 'water rights', 'regional security', 'disaster relief'))}",
        )
    elif topic == "Sports":
        team, team2 = rng.sample(_TEAMS, 2)
        options = (
            f"{team} beat {team2} {rng.randint(1, 6)}-{rng.randint(0, 5)} to reach the "
            f"{rng.choice(('semi-finals', 'final', 'quarter-finals'))}",
            f"{rng.choice(_ATHLETES)} wins {rng.choice(('world', 'national', 'European', 'indoor'))} "
            f"title in {rng.choice(_CITIES)}",
            f"Coach of {team} resigns after {rng.randint(3, 12)} straight defeats",
            f"{team} sign star striker from {team2} in record transfer",
            f"Injury rules {team} captain out of "
            f"{rng.choice(('the league opener', 'the cup final', 'the derby', 'the playoffs'))}",
        )
    elif topic == "Business":
        company, company2 = rng.sample(_COMPANIES, 2)
        options = (
            f"{company} shares {rng.choice(('rise', 'fall', 'jump', 'slide'))} {rng.randint(2, 19)}% after "
            f"{rng.choice(('quarterly earnings', 'a profit warning', 'a sales update', 'merger talk'))}",
            f"{company} to buy {company2} in {rng.randint(2, 60)} billion dollar deal",
            f"Central bank of {rng.choice(_COUNTRIES)} {rng.choice(('raises', 'cuts'))} interest rates to "
            f"{rng.randint(1, 9)}.{rng.choice((0, 25, 5, 75))}%",
            f"{company} cuts {rng.randrange(200, 5000, 100)} jobs as "
            f"{rng.choice(('sales slow', 'costs climb', 'profits fall', 'demand weakens'))}",
            f"Oil prices {rng.choice(('climb', 'drop', 'steady'))} as "
            f"{rng.choice(('supply fears grow', 'demand weakens', 'stockpiles shrink', 'exports recover'))}",
        )
    else:  # Sci/Tech
        tech = rng.choice(_TECH_COMPANIES)
        options = (
            f"{tech} unveils {rng.choice(_GADGETS)} with {rng.choice(_FEATURES)}",
            f"Scientists discover {rng.choice(_DISCOVERIES)} "
            f"using {rng.choice(('a space telescope', 'radio telescopes', 'deep-sea robots', 'satellite data'))}",
            f"Researchers build {rng.choice(('a battery', 'a solar cell', 'a robot', 'a computer chip'))} that "
            f"{rng.choice(_BREAKTHROUGHS)}",
            f"{tech} fixes security flaw in "
            f"{rng.choice(('its web browser', 'its email app', 'its operating system', 'its cloud service'))}",
            f"Space agency launches {rng.choice(('a probe', 'a satellite', 'a rover'))} to study "
            f"{rng.choice(('Mars', 'the moons of Jupiter', 'the Sun', 'near-Earth asteroids', 'ocean temperatures'))}",
        )
    return options[shape]


def topic_prompt(text: str) -> str:
    """The instruction shared by offline_topic and ag_news."""
    return f"{TOPIC_INSTRUCTION}\nArticle: {text}"


def _topic_example(rng: random.Random) -> Example:
    topic = rng.choice(AG_NEWS_LABELS)
    return Example(prompt=topic_prompt(_headline(rng, topic)), answer=topic, kind="task", label=topic)


def offline_topic(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """AG-News-like headlines; answer and label are World, Sports, Business or Sci/Tech."""
    return _generate("offline_topic", split, size, seed, _topic_example)


# --------------------------------------------------------------------------- hub row converters

_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


def gsm8k_row_to_example(row: dict[str, Any]) -> Example:
    """A GSM8K row {question, answer: "...#### N"} -> answer "... The answer is N.", label "N".

    The answer is rewritten to the offline generator's format so a model fine-tuned
    on either ends in the same phrase, which the accuracy check reads.
    """
    reasoning, marker, final = str(row["answer"]).rpartition("####")
    if not marker:
        raise ValueError(f"gsm8k row has no '#### N' final answer: {str(row['answer'])[-80:]!r}")
    label = final.strip().replace(",", "")
    # The <<48/2=24>> calculator annotations are tooling artefacts, not text to imitate.
    reasoning = _CALCULATOR_ANNOTATION.sub("", reasoning).strip()
    answer = f"{reasoning}\nThe answer is {label}." if reasoning else f"The answer is {label}."
    return Example(prompt=str(row["question"]).strip(), answer=answer, kind="task", label=label)


def sst2_row_to_example(row: dict[str, Any]) -> Example:
    """An SST-2 row {sentence, label 0/1} -> answer/label "negative"/"positive"."""
    label = row["label"]
    if label not in (0, 1):
        # The hub's test split carries label -1 (hidden): it cannot be scored.
        raise ValueError(f"sst2 label must be 0 or 1, got {label!r} (the test split's labels are hidden)")
    polarity = "positive" if label == 1 else "negative"
    return Example(prompt=sentiment_prompt(str(row["sentence"]).strip()), answer=polarity, kind="task", label=polarity)


def ag_news_row_to_example(row: dict[str, Any]) -> Example:
    """An AG News row {text, label 0-3} -> answer/label World, Sports, Business or Sci/Tech."""
    label = row["label"]
    if not isinstance(label, int) or not 0 <= label < len(AG_NEWS_LABELS):
        raise ValueError(f"ag_news label must be 0-3, got {label!r}")
    topic = AG_NEWS_LABELS[label]
    return Example(prompt=topic_prompt(str(row["text"]).strip()), answer=topic, kind="task", label=topic)


def alpaca_row_to_example(row: dict[str, Any]) -> Example:
    """An Alpaca row {instruction, input, output} -> Example with no label (no exact-match metric)."""
    instruction = str(row["instruction"]).strip()
    context = str(row.get("input") or "").strip()
    # "### Input:" mirrors the original Alpaca template for rows with an input, so
    # that rendered into our Alpaca template the prompt reads as the authors'.
    prompt = f"{instruction}\n\n### Input:\n{context}" if context else instruction
    return Example(prompt=prompt, answer=str(row["output"]).strip(), kind="task", label=None)


# --------------------------------------------------------------------------- hub loaders


@dataclass(frozen=True)
class _HubTask:
    name: str
    repos: tuple[str, ...]  # tried in order: older datasets releases know the short names only
    config: str | None
    splits: dict[str, str]  # our split -> hub split
    convert: Callable[[dict[str, Any]], Example]
    offline_alternative: str
    # True when the hub has no usable test split and ours is carved by prompt hash.
    hash_split: bool = False


def _load_hub_split(spec: _HubTask, hub_split: str) -> Dataset:
    try:
        import datasets
    except ImportError:
        raise DataUnavailableError(
            f"task {spec.name!r} needs the 'datasets' package (pip install datasets); "
            f"offline, use task {spec.offline_alternative!r} or task 'local' with data.task_file"
        ) from None
    from panacea_platform.data.hub import HUB_PROBE_SECONDS, hub_offline, hub_reachable

    if not hub_offline() and not hub_reachable():
        # Fail in seconds: the hub client would retry for ~25 s per repo.
        raise DataUnavailableError(
            f"task {spec.name!r}: the Hugging Face hub is unreachable from this machine (no connection within "
            f"{HUB_PROBE_SECONDS:g} s; with a local copy in the cache, set HF_HUB_OFFLINE=1). Use task "
            f"{spec.offline_alternative!r} instead, or task 'local' with data.task_file "
            "(a JSONL, CSV or Parquet file with fields prompt, answer, optional label)."
        )
    causes = []
    for repo in spec.repos:
        try:
            return datasets.load_dataset(repo, spec.config, split=hub_split)
        except Exception as exc:  # the hub client raises many types (OSError, HTTP, not found); all mean "not here"
            causes.append(f"{repo}: {type(exc).__name__}: {str(exc)[:200]}")
    raise DataUnavailableError(
        f"task {spec.name!r}: could not load {' or '.join(spec.repos)} (split {hub_split!r}) from the Hugging Face "
        "hub; "
        f"the hub is unreachable from this machine or the dataset is not cached ({'; '.join(causes)}). "
        f"Use task {spec.offline_alternative!r} instead, or task 'local' with data.task_file "
        "(a JSONL, CSV or Parquet file with fields prompt, answer, optional label)."
    )


def _load_hub_task(spec: _HubTask, split: str, size: int, seed: int) -> list[Example]:
    _check_request(spec.name, split, size)
    hub_split = spec.splits[split]
    dataset = _load_hub_split(spec, hub_split)
    source = f"hub dataset {spec.repos[0]!r} split {hub_split!r}"
    if spec.hash_split:
        wanted = split == "test"
        examples = [e for e in map(spec.convert, dataset.to_list()) if is_heldout(e.prompt) == wanted]
        return _sample(spec.name, split, examples, size, seed, source)
    # Sample indices before converting: AG News has 120k rows and only `size` are needed.
    available = len(dataset)
    if size > available:
        raise NotEnoughDataError(
            f"task {spec.name!r}: asked for {size} {split} examples but only {available} are available "
            f"in {source}; {_size_hint(split)}"
        )
    indices = _rng(spec.name, seed, split).sample(range(available), size)
    return [spec.convert(row) for row in dataset.select(indices).to_list()]


_GSM8K = _HubTask(
    "gsm8k",
    ("openai/gsm8k", "gsm8k"),
    "main",
    {"train": "train", "test": "test"},
    gsm8k_row_to_example,
    "offline_arithmetic",
)
# SST-2's test labels are hidden (-1), so its validation split is the test set.
_SST2 = _HubTask(
    "sst2",
    ("stanfordnlp/sst2", "sst2"),
    None,
    {"train": "train", "test": "validation"},
    sst2_row_to_example,
    "offline_sentiment",
)
_AG_NEWS = _HubTask(
    "ag_news",
    ("fancyzhx/ag_news", "ag_news"),
    None,
    {"train": "train", "test": "test"},
    ag_news_row_to_example,
    "offline_topic",
)
# Alpaca ships one split; the held-out side is carved from it by prompt hash.
_ALPACA = _HubTask(
    "alpaca",
    ("tatsu-lab/alpaca",),
    None,
    {"train": "train", "test": "train"},
    alpaca_row_to_example,
    "local",
    hash_split=True,
)


def gsm8k(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """GSM8K (hub "openai/gsm8k", config "main"); label = the final number."""
    return _load_hub_task(_GSM8K, split, size, seed)


def sst2(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """SST-2 (hub "stanfordnlp/sst2"); test = the hub's validation split."""
    return _load_hub_task(_SST2, split, size, seed)


def ag_news(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """AG News (hub "fancyzhx/ag_news"); label = the topic word."""
    return _load_hub_task(_AG_NEWS, split, size, seed)


def alpaca(data_config: DataConfig | None, split: str, size: int, seed: int) -> list[Example]:
    """Alpaca (hub "tatsu-lab/alpaca"); no label, so only losses are reported for it."""
    return _load_hub_task(_ALPACA, split, size, seed)


# --------------------------------------------------------------------------- local


def split_by_prompt_hash(
    examples: Sequence[Example], fraction: float = TEST_FRACTION
) -> tuple[list[Example], list[Example]]:
    """(train, test): the distinct prompts with the lowest hashes, `fraction` of them (at least 1), are test.

    Ranking by hash instead of bucketing guarantees a non-empty test side for a
    small file. Duplicated prompts stay together, so the sides never overlap.
    The split ignores the seed: every seed of a sweep is scored on the same rows.
    """
    keys = sorted({normalise_prompt(e.prompt) for e in examples}, key=lambda k: (_prompt_hash(k), k))
    if len(keys) < 2:
        raise NotEnoughDataError(f"a train/test split needs at least 2 distinct prompts, got {len(keys)}")
    test_count = max(1, round(fraction * len(keys)))
    test_keys = set(keys[:test_count])
    train = [e for e in examples if normalise_prompt(e.prompt) not in test_keys]
    test = [e for e in examples if normalise_prompt(e.prompt) in test_keys]
    return train, test


def local(data_config: DataConfig, split: str, size: int, seed: int) -> list[Example]:
    """The user's own file (data.task_file): fields prompt, answer, optional label and category."""
    _check_request("local", split, size)
    path = getattr(data_config, "task_file", None)
    if not path:
        raise ValueError("task 'local' needs data.task_file: a JSONL, CSV or Parquet file with fields prompt, answer")
    examples = [
        Example(
            prompt=record["prompt"],
            answer=record["answer"],
            kind="task",
            label=optional_text(record, "label"),
            category=optional_text(record, "category"),
        )
        for record in read_records(path, ("prompt", "answer"))
    ]
    try:
        train, test = split_by_prompt_hash(examples)
    except NotEnoughDataError as exc:
        raise NotEnoughDataError(f"task 'local' ({path}): {exc}") from None
    return _sample("local", split, test if split == "test" else train, size, seed, str(path))
