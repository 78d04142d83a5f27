"""Generate the prompt set used to train and evaluate draft heads.

Writes `spec_compiler/data/prompts_train.jsonl` and `spec_compiler/data/prompts_dev.jsonl`, one
record a line: {"id", "category", "template", "prompt"}.

How the set is built, and why:
- Prompts come from many *templates*: a sentence frame with slots filled from varied subjects
  (`T(...)`), a small generator for math/logic with computed numbers (`G(...)`), and hand-written
  one-off prompts, each its own template (`ONE_OFFS`). Variety matters because a draft trained on
  one template's continuations overfits it and inflates acceptance.
- No template supplies more than `MAX_SHARE` of the prompts (asserted), so no frame dominates.
- The development part is split *by template*, stratified by category: a dev prompt never shares
  a frame with a training prompt, so dev acceptance measures generalisation, not frame recall.
- Prompts are deduplicated (case and whitespace folded). Generation is deterministic (`SEED`):
  rerunning this script reproduces the committed files byte for byte.

    python tools/make_prompts.py [--out-dir spec_compiler/data]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SEED = 20261126
PER_TEMPLATE = 9    # prompts drawn from each parametrised template (fewer if it has fewer fills)
DEV_SHARE = 0.15    # of each category's prompts, rounded, taken as whole templates
MAX_SHARE = 0.05    # no template may supply more than this share of all prompts
WIDE_PER_TEMPLATE = 40  # the wide training set: prompts per template (train and train-only frames)
WIDE_PER_GENERATOR = 16  # ... and per computed-number generator (G), so math does not dominate
WIDE_MAX_SHARE = 0.03
SELF_FILE = "prompts_self.jsonl"  # prompts the target wrote (tools/self_prompts.py), if present
OUT_DIR = Path(__file__).resolve().parents[1] / "spec_compiler" / "data"


@dataclass
class T:
    """A sentence frame; every combination of slot values is a candidate prompt."""

    id: str
    category: str
    frame: str
    slots: dict[str, list[str]] = field(default_factory=dict)
    pairs: list[tuple[str, ...]] | None = None  # slots that must go together: (value, value, ...)
    pair_keys: tuple[str, ...] = ()

    def candidates(self, rng: random.Random, n: int = 0) -> list[str]:  # n: G's; T gives all
        keys = list(self.slots)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*self.slots.values())]
        if self.pairs is not None:
            combos = [{**c, **dict(zip(self.pair_keys, p))} for c in combos for p in self.pairs]
        rng.shuffle(combos)
        return [self.frame.format(**c) for c in _spread(combos)]


def _spread(combos: list[dict]) -> list[dict]:
    """Reorder so each next combination reuses the fewest already-used slot values: the first
    prompts of a template then vary every slot instead of repeating one subject."""
    used: Counter = Counter()
    out, rest = [], list(combos)
    while rest:
        best = min(range(len(rest)), key=lambda i: sum(used[kv] for kv in rest[i].items()))
        out.append(rest.pop(best))
        used.update(out[-1].items())
    return out


@dataclass
class G:
    """A generator of prompts with computed content (numbers, names, orderings)."""

    id: str
    category: str
    make: Callable[[random.Random], str]

    def candidates(self, rng: random.Random, n: int = PER_TEMPLATE * 6) -> list[str]:
        return [self.make(rng) for _ in range(n)]


NAMES = ["Maya", "Omar", "Lena", "Kenji", "Sofia", "Diego", "Amara", "Tom", "Priya", "Lukas",
         "Chloe", "Ravi", "Ingrid", "Mateo", "Aisha", "Ben", "Yuki", "Nadia", "Felix", "Zara"]
ITEMS = [("notebooks", 3), ("apples", 1), ("pencils", 2), ("movie tickets", 12), ("sandwiches", 6),
         ("plant pots", 8), ("bus passes", 15), ("candles", 4), ("cupcakes", 3), ("T-shirts", 14)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


# ---------------------------------------------------------------- math (computed answers)
def _shopping(r):
    name, (item, price) = r.choice(NAMES), r.choice(ITEMS)
    n = r.randint(2, 9)
    return f"{name} buys {n} {item} at ${price} each. How much does {name} spend in total?"


def _percent(r):
    p, n = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), r.choice([40, 60, 80, 120, 150, 240, 360, 500])
    return r.choice([f"What is {p}% of {n}?", f"Calculate {p} percent of {n}.",
                     f"A jacket costs ${n} and is on sale for {p}% off. What is the sale price?"])


def _linear(r):
    x, a, b = r.randint(-6, 12), r.randint(2, 9), r.randint(1, 30)
    return f"Solve for x: {a}x + {b} = {a * x + b}. Show your steps."


def _speed(r):
    t, v = r.randint(2, 6), r.choice([45, 60, 72, 80, 90, 110])
    vehicle = r.choice(["train", "car", "bus", "ferry", "cyclist"])
    return f"A {vehicle} travels {t * v if vehicle != 'cyclist' else t * 15} km in {t} hours. What is its average speed?"


def _area(r):
    shape = r.choice(["rectangle", "circle", "triangle", "square"])
    a, b = r.randint(3, 15), r.randint(3, 15)
    dims = {"rectangle": f"a length of {a} cm and a width of {b} cm", "circle": f"a radius of {a} m",
            "triangle": f"a base of {a} cm and a height of {b} cm", "square": f"sides of {a} inches"}
    return f"What is the area of a {shape} with {dims[shape]}?"


def _fraction(r):
    g, a, b = r.randint(2, 9), r.randint(1, 9), r.randint(2, 11)
    if a >= b:
        a, b = b - 1, a + 1
    return r.choice([f"Simplify the fraction {a * g}/{b * g}.", f"Reduce {a * g}/{b * g} to lowest terms."])


def _multistep(r):
    name, thing = r.choice(NAMES), r.choice(["marbles", "stickers", "books", "seashells", "stamps"])
    a, b, c = r.randint(15, 60), r.randint(2, 14), r.randint(3, 20)
    return (f"{name} has {a} {thing}. {name} gives {b} to a friend and then buys {c} more. "
            f"How many {thing} does {name} have now?")


def _arith(r):
    a, b = r.randint(12, 99), r.randint(11, 49)
    return r.choice([f"What is {a} times {b}?", f"Calculate {a * b} divided by {b}.",
                     f"What is {a * 17} minus {b * 9}?", f"Add {a * 13} and {b * 21}."])


# ---------------------------------------------------------------- reasoning (computed)
def _ordering(r):
    a, b, c = r.sample(NAMES, 3)
    adj, least = r.choice([("taller", "shortest"), ("older", "youngest"), ("faster", "slowest"),
                           ("richer", "poorest"), ("heavier", "lightest")])
    return f"{a} is {adj} than {b}, and {b} is {adj} than {c}. Who is the {least}? Explain."


def _sequence(r):
    kind = r.choice(["add", "mul", "square"])
    if kind == "add":
        s, d = r.randint(1, 20), r.randint(2, 9)
        seq = [s + d * i for i in range(5)]
    elif kind == "mul":
        s, m = r.randint(1, 5), r.choice([2, 3])
        seq = [s * m ** i for i in range(5)]
    else:
        s = r.randint(1, 4)
        seq = [(s + i) ** 2 for i in range(5)]
    return f"What is the next number in the sequence {', '.join(map(str, seq))}? Explain the pattern."


def _weekday(r):
    day, n = r.choice(DAYS), r.choice([3, 5, 10, 12, 15, 20, 25, 30, 45, 100])
    return r.choice([f"If today is {day}, what day of the week will it be in {n} days?",
                     f"If today is {day}, what day of the week was it {n} days ago?"])


def _ages(r):
    a, b = r.sample(NAMES, 2)
    x, d, y = r.randint(6, 30), r.randint(2, 9), r.randint(3, 10)
    return (f"{a} is {d} years older than {b}. In {y} years, {b} will be {x + y}. "
            f"How old is {a} now?")


TEMPLATES: list[T | G] = [
    # ------------------------------------------------------------------------- writing
    T("poem-about", "writing", "Write a short poem about {s}.", {"s": [
        "autumn leaves", "a lighthouse in a storm", "the first snow of winter", "an old bicycle",
        "rain on a city street", "a cat asleep in the sun", "the ocean at night",
        "a forgotten garden", "morning coffee", "an empty train station", "homesickness",
        "a grandmother's kitchen"]}),
    T("haiku", "writing", "Write a haiku about {s}.", {"s": [
        "a spring morning", "a busy highway", "fireflies", "the moon over a lake", "a library",
        "a winter forest", "a kettle boiling", "the last day of summer", "a paper boat"]}),
    T("short-story", "writing", "Write a short story, under 200 words, about {who} who {what}.", {
        "who": ["a shy robot", "a retired astronaut", "a young baker", "a lost dog", "a lighthouse keeper"],
        "what": ["finds a mysterious letter", "learns to paint", "makes an unexpected friend",
                 "has to cross a frozen river", "wins a small-town contest"]}),
    T("email", "writing", "Write a {tone} email to {task}.", {
        "tone": ["polite", "short and friendly", "professional"],
        "task": ["my landlord asking him to repair the heating", "my team announcing a new meeting time",
                 "a customer apologizing for a late delivery", "my professor asking for a deadline extension",
                 "a colleague thanking her for her help on a project",
                 "a hotel asking whether they allow pets"]}),
    T("product-desc", "writing", "Write a product description for {s}.", {"s": [
        "a stainless steel water bottle", "a pair of noise-cancelling headphones",
        "a handmade wooden chess set", "a solar-powered garden lamp", "a lightweight hiking backpack",
        "an organic lavender soap", "a smart thermostat", "a children's picture book about whales",
        "a foldable electric scooter", "a ceramic coffee mug"]}),
    T("novel-opening", "writing", "Write the opening paragraph of a {genre} novel set in {place}.", {
        "genre": ["mystery", "science fiction", "fantasy", "romance", "historical"],
        "place": ["a small fishing village", "a space station orbiting Mars", "Victorian London",
                  "a desert town", "a floating city"]}),
    T("slogan", "writing", "Come up with a catchy slogan for {s}.", {"s": [
        "a neighborhood bakery", "a bike repair shop", "a recycling campaign", "a dog-walking service",
        "a new brand of sparkling water", "a public library", "a yoga studio", "a math tutoring business",
        "a local farmers' market", "an eco-friendly cleaning company"]}),
    T("rewrite-tone", "writing", "Rewrite this sentence to sound more {tone}: \"{sent}\"", {
        "tone": ["formal", "friendly", "confident", "polite"],
        "sent": ["I can't come to the meeting tomorrow.", "Your report has a lot of mistakes.",
                 "We need the money by Friday.", "This idea won't work.",
                 "Send me the files when you get a chance.", "The party was kind of boring.",
                 "You forgot to reply to my message again.", "I think I deserve a better grade.",
                 "The train is late, so I'll be late too.", "Nobody told me about the change."]}),
    T("speech", "writing", "Write a short speech for {s}.", {"s": [
        "a best friend's wedding", "a high school graduation", "the opening of a community garden",
        "a retirement party for a teacher", "a team that just lost the championship",
        "the first day of a new company", "a charity fundraiser for an animal shelter",
        "a science fair awards ceremony"]}),
    T("limerick", "writing", "Write a funny limerick about {s}.", {"s": [
        "a cat who loves cheese", "a forgetful wizard", "a clumsy penguin", "a talking teapot",
        "a dog who hates baths", "a very slow snail", "a pirate who can't swim", "a chef who burns everything"]}),
    T("blog-intro", "writing", "Write an engaging introduction for a blog post about {s}.", {"s": [
        "learning a new language as an adult", "growing tomatoes on a balcony",
        "the benefits of walking every day", "traveling on a tight budget", "starting to run at forty",
        "cooking for one person", "decluttering your home", "reading more books"]}),
    # ------------------------------------------------------------------------- roleplay
    T("persona-question", "roleplay", "You are {persona}. {q}", pairs=[
        ("a pirate captain", "Tell me about your most dangerous voyage."),
        ("a medieval blacksmith", "What does a normal working day look like for you?"),
        ("a wise old wizard", "What advice would you give a young apprentice?"),
        ("a detective in 1920s Chicago", "Describe the case that kept you up at night."),
        ("an astronaut on the International Space Station", "What is the hardest part of living in space?"),
        ("a friendly dragon", "Why do people fear you, and are they right to?"),
        ("a chef at a busy Italian restaurant", "What is your favorite dish to cook, and why?"),
        ("a time traveler from the year 3000", "What surprises you most about our time?"),
        ("a lighthouse keeper on a remote island", "How do you spend the long winter evenings?"),
        ("a knight guarding a castle", "What would you do if a stranger approached the gate at night?"),
    ], pair_keys=("persona", "q")),
    T("job-day", "roleplay", "Pretend you are a {job} and describe your typical day to a group of {aud}.", {
        "job": ["firefighter", "marine biologist", "zookeeper", "commercial airline pilot",
                "veterinarian", "librarian"],
        "aud": ["curious schoolchildren", "university students", "retired teachers"]}),
    T("shop-roleplay", "roleplay", "Let's role-play. You are {clerk} and I am a customer looking for "
      "{item}. Start the conversation.", pairs=[
        ("a bookseller", "a birthday gift for my sister"),
        ("a bookseller", "a mystery novel for a long flight"),
        ("a salesperson in an electronics store", "a laptop for a university student"),
        ("a salesperson in an electronics store", "headphones for the gym"),
        ("a florist", "flowers that will cheer up a friend in hospital"),
        ("a florist", "a plant that is hard to kill"),
        ("a shoe shop assistant", "comfortable shoes for walking all day"),
        ("a baker", "a cake for my grandfather's ninetieth birthday"),
        ("a pet shop owner", "my first pet fish"),
    ], pair_keys=("clerk", "item")),
    T("tour-guide", "roleplay", "Act as a tour guide in {city} and tell me about three places I "
      "should visit first.", {"city": ["Rome", "Kyoto", "Istanbul", "Paris", "Mexico City", "Cairo",
                                       "Edinburgh", "Rio de Janeiro", "Prague", "Bangkok"]}),
    T("coach-plan", "roleplay", "Act as my {coach} and give me a simple plan to {goal}.", pairs=[
        ("personal trainer", "get ready for a 5 km run in two months"),
        ("personal trainer", "do my first full push-up"),
        ("study coach", "prepare for an important exam next month"),
        ("study coach", "read one book a month"),
        ("career mentor", "switch from retail to an office job"),
        ("career mentor", "ask my manager for more responsibility"),
        ("productivity coach", "stay focused while working from home"),
        ("sleep coach", "build a habit of waking up early"),
        ("language tutor", "hold a basic conversation in Italian by summer"),
    ], pair_keys=("coach", "goal")),
    T("object-voice", "roleplay", "Pretend you are {obj} and describe {what}.", pairs=[
        ("an old oak tree", "the changes you have seen over a hundred years"),
        ("a river", "your journey from the mountains to the sea"),
        ("a smartphone", "a day in the life of your owner"),
        ("a library book", "the different people who have borrowed you"),
        ("a lighthouse", "the ships you have guided home"),
        ("a suitcase", "the trips you remember best"),
        ("a pair of running shoes", "the marathon you just finished"),
        ("a snowman", "how you feel as spring approaches"),
        ("a museum statue", "what visitors say when they think no one is listening"),
    ], pair_keys=("obj", "what")),
    T("interviewer", "roleplay", "You are interviewing me for a job as {pos}. Ask me your first "
      "question and wait for my answer.", {"pos": [
        "a junior software developer", "a barista", "a museum guide", "a summer camp counselor",
        "a hotel receptionist", "a data analyst", "a graphic designer", "a nurse"]}),
    T("historical-voice", "roleplay", "Imagine you are {who}. In a few paragraphs, describe {what} "
      "in your own words.", pairs=[
        ("a Roman soldier stationed on Hadrian's Wall", "a winter on the frontier"),
        ("a sailor on one of Columbus's ships", "the moment land was sighted"),
        ("a factory worker in 1850s Manchester", "a typical working day"),
        ("a scribe in ancient Egypt", "your work and training"),
        ("a Viking trader", "your journey to a distant market"),
        ("a monk copying manuscripts in the Middle Ages", "a day in the scriptorium"),
        ("a merchant on the Silk Road", "the goods you carry and the people you meet"),
        ("a farmer during the Dust Bowl", "the storms that ruined your harvest"),
    ], pair_keys=("who", "what")),
    # ------------------------------------------------------------------------- reasoning
    T("syllogism", "reasoning", "If all {a} are {b}, and {x} is one of the {a}, is {x} definitely "
      "{b1}? Explain your reasoning.", pairs=[
        ("roses in this garden", "red", "the rose by the gate", "red"),
        ("members of the chess club", "students", "Ana", "a student"),
        ("birds in the cage", "parrots", "the green bird", "a parrot"),
        ("cars in the lot", "electric", "the blue sedan", "electric"),
        ("cookies in the jar", "gluten-free", "the largest cookie", "gluten-free"),
        ("employees on the third floor", "engineers", "Mr. Lee", "an engineer"),
        ("books on this shelf", "novels", "the thickest book", "a novel"),
        ("players on the team", "over eighteen", "the goalkeeper", "over eighteen"),
    ], pair_keys=("a", "b", "x", "b1")),
    G("ordering", "reasoning", _ordering),
    G("sequence", "reasoning", _sequence),
    G("weekday", "reasoning", _weekday),
    G("ages", "reasoning", _ages),
    T("odd-one-out", "reasoning", "Which is the odd one out: {s}? Explain why.", {"s": [
        "apple, banana, carrot, cherry", "Mercury, Venus, Moon, Mars", "violin, guitar, flute, cello",
        "square, triangle, cube, circle", "Paris, Berlin, Madrid, Sydney", "eagle, penguin, sparrow, bat",
        "copper, iron, plastic, gold", "March, May, June, Monday", "whale, shark, dolphin, seal"]}),
    T("pros-cons", "reasoning", "What are the pros and cons of {s}?", {"s": [
        "working from home", "buying an electric car", "living in a big city", "homeschooling children",
        "renting instead of buying a house", "a four-day work week", "learning to code as a child",
        "using public transport every day", "adopting a dog instead of a cat"]}),
    T("which-heavier", "reasoning", "Which is heavier: {a} or {b}? Explain briefly.", pairs=[
        ("a kilogram of feathers", "a kilogram of bricks"), ("an elephant", "a blue whale"),
        ("a liter of water", "a liter of olive oil"), ("a bowling ball", "a basketball"),
        ("a gold bar", "a silver bar of the same size"), ("a pound of apples", "a pound of nails"),
        ("a cup of ice", "the same cup of water after the ice melts"),
        ("a school bus", "a grown hippopotamus"),
    ], pair_keys=("a", "b")),
    T("cause-effect", "reasoning", "{s} What are the most likely explanations? List them from most "
      "to least likely.", {"s": [
        "My houseplant's leaves are turning yellow.", "The milk in my fridge went sour two days early.",
        "My phone battery drains much faster than it used to.", "The bread I baked came out flat and dense.",
        "My car makes a squeaking noise when I brake.", "The grass in one corner of the yard died.",
        "The Wi-Fi at home is slow only in the evenings.", "My cat stopped eating her usual food."]}),
    # ------------------------------------------------------------------------- math
    G("shopping", "math", _shopping),
    G("percent", "math", _percent),
    G("linear-eq", "math", _linear),
    G("speed", "math", _speed),
    G("area", "math", _area),
    G("fraction", "math", _fraction),
    G("multistep", "math", _multistep),
    G("arith", "math", _arith),
    T("explain-math", "math", "Explain how to {s}, with a worked example.", {"s": [
        "find the least common multiple of two numbers", "convert a fraction to a percentage",
        "calculate the mean, median and mode of a list", "add two fractions with different denominators",
        "find the slope of a line through two points", "compute simple interest",
        "round a number to two decimal places", "use the Pythagorean theorem",
        "divide a number by a fraction", "calculate the probability of rolling two sixes"]}),
    T("unit-convert", "math", "Convert {s}. Show the calculation.", {"s": [
        "5 miles to kilometers", "72 degrees Fahrenheit to Celsius", "3.5 hours to minutes",
        "250 grams to ounces", "2 liters to cups", "1500 meters to miles", "100 km/h to m/s",
        "6 feet 2 inches to centimeters", "45 minutes to a fraction of an hour"]}),
    # ------------------------------------------------------------------------- coding
    T("py-function", "coding", "Write a Python function that {s}.", {"s": [
        "checks whether a string is a palindrome", "returns the n-th Fibonacci number",
        "counts the vowels in a sentence", "removes duplicates from a list while keeping the order",
        "finds the largest number in a list without using max()", "reverses the words in a sentence",
        "converts a temperature from Celsius to Fahrenheit", "checks whether a number is prime",
        "merges two sorted lists into one sorted list", "returns the most common word in a text",
        "flattens a nested list", "validates a simple email address"]}),
    T("how-in-lang", "coding", "How do I {task} in {lang}?", {
        "task": ["read a text file line by line", "sort a list of dictionaries by a key",
                 "make an HTTP GET request", "get the current date and time", "split a string by commas"],
        "lang": ["Python", "JavaScript", "Go"]}),
    T("explain-code", "coding", "Explain what this Python code does:\n```python\n{code}\n```", {"code": [
        "nums = [x * x for x in range(10) if x % 2 == 0]",
        "def f(s):\n    return s == s[::-1]",
        "counts = {}\nfor w in text.split():\n    counts[w] = counts.get(w, 0) + 1",
        "with open('data.txt') as fh:\n    lines = [l.strip() for l in fh if l.strip()]",
        "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)",
        "pairs = list(zip(names, scores))\npairs.sort(key=lambda p: p[1], reverse=True)",
        "result = ', '.join(str(i) for i in range(1, 6))",
        "try:\n    x = int(value)\nexcept ValueError:\n    x = 0"]}),
    T("lang-diff", "coding", "What is the difference between {a} and {b} in {lang}?", pairs=[
        ("a list", "a tuple", "Python"), ("==", "===", "JavaScript"), ("let", "const", "JavaScript"),
        ("a class", "a struct", "C++"), ("an interface", "an abstract class", "Java"),
        ("append()", "extend()", "Python"), ("a process", "a thread", "operating systems"),
        ("GET", "POST", "HTTP"), ("INNER JOIN", "LEFT JOIN", "SQL"), ("is", "==", "Python"),
    ], pair_keys=("a", "b", "lang")),
    T("find-bug", "coding", "This function has a bug. Find it and fix it:\n```python\n{code}\n```", {"code": [
        "def average(nums):\n    return sum(nums) / len(nums) - 1",
        "def last_item(items):\n    return items[len(items)]",
        "def is_even(n):\n    return n % 2 == 1",
        "def count_to(n):\n    for i in range(n):\n        print(i + 2)",
        "def greet(name):\n    print('Hello, ' + name\n",
        "def total(prices):\n    t = 0\n    for p in prices:\n        t = p\n    return t",
        "def find_max(nums):\n    best = 0\n    for n in nums:\n        if n > best:\n            best = n\n    return best",
        "def add_item(item, items=[]):\n    items.append(item)\n    return items"]}),
    T("sql-query", "coding", "Write a SQL query that {s}.", {"s": [
        "finds the ten most expensive products in a products table",
        "counts how many orders each customer has placed",
        "lists employees who earn more than the average salary",
        "finds all users who signed up in the last 30 days",
        "returns the total sales per month for the year 2023",
        "deletes duplicate rows from a table of email addresses",
        "finds customers who have never placed an order",
        "shows the second highest salary in an employees table"]}),
    T("explain-concept-code", "coding", "Explain {s} to a beginner programmer, with a short example.", {"s": [
        "recursion", "a hash map", "big-O notation", "object-oriented programming", "a REST API",
        "version control with git", "unit testing", "a closure", "asynchronous programming",
        "the difference between compiled and interpreted languages"]}),
    T("js-function", "coding", "Write a JavaScript function to {s}.", {"s": [
        "capitalize the first letter of every word in a string", "shuffle an array",
        "debounce another function", "count how many times each character appears in a string",
        "check whether two strings are anagrams", "format a number as a price with two decimals",
        "sum all the numbers in a nested array", "return the unique values of an array"]}),
    # ------------------------------------------------------------------------- extraction
    T("extract-names", "extraction", "List the names of all the people mentioned in this text: \"{t}\"", {"t": [
        "Yesterday Maria met her brother Paul at the station, and together they visited Dr. Chen.",
        "The committee, led by Ahmed Karimi, thanked Sarah Lopez and James O'Neill for their work.",
        "When Grandpa Joe called, Lily and her friend Noah were still baking cookies.",
        "The award went to Hiro Tanaka, while the runner-up prize was shared by Eva Novak and Sam Reid.",
        "Professor Alvarez asked Tom to help Jenny with the experiment before Friday.",
        "In the story, Captain Mills rescues a girl named Rosa and her dog, Biscuit.",
        "After the match, coach Dana Fisher praised the goalkeeper, Luis Ortega.",
        "Anna wrote to her cousin Mark, who had just moved to Oslo with his wife, Kari."]}),
    T("extract-dates", "extraction", "Find every date in the following text and list them in "
      "YYYY-MM-DD format: \"{t}\"", {"t": [
        "The contract was signed on March 3, 2021 and expires on 15 June 2024.",
        "Our store opened on January 9th, 2019; the second branch followed on October 1st, 2022.",
        "Please submit the form by 30 April 2023. Late forms will be reviewed on May 7, 2023.",
        "She was born on 12 February 1990 and graduated on June 20, 2012.",
        "The festival runs from July 14, 2025 until July 20, 2025.",
        "The old bridge closed on 1 November 2018 and the new one opened on August 25, 2020.",
        "Payments are due on February 28, 2024 and March 31, 2024.",
        "The meeting moved from September 5, 2023 to 12 September 2023."]}),
    T("extract-json", "extraction", "Extract the product, price and store from this sentence and "
      "return them as JSON: \"{t}\"", {"t": [
        "I bought a blue umbrella for $12.99 at Harbor Market.",
        "Lucas picked up a pair of hiking boots for 89 euros from Alpine Outfitters.",
        "The bakery on Main Street sells sourdough loaves for $6.",
        "We found a used guitar at Melody Music for only $150.",
        "At GreenLeaf Garden Center, a bag of potting soil costs $7.49.",
        "My sister ordered a desk lamp for £24 from BrightHome.",
        "TechZone is selling wireless earbuds for $59 this week.",
        "A dozen eggs cost $3.20 at the Sunny Farm shop."]}),
    T("summarize-one", "extraction", "Summarize this paragraph in one sentence: \"{t}\"", {"t": [
        "Honeybees communicate the location of flowers through a 'waggle dance'. The angle of the "
        "dance shows the direction relative to the sun, and its length shows the distance. Other "
        "bees watch the dance and fly straight to the food source.",
        "The town council voted on Tuesday to turn the old railway line into a cycling path. The "
        "project will cost about two million dollars and should be finished in eighteen months. "
        "Supporters say it will reduce traffic, while some residents worry about noise.",
        "Sleep plays an important role in memory. During deep sleep, the brain replays the day's "
        "experiences and strengthens the connections between neurons. Students who sleep well "
        "after studying tend to remember more the next day.",
        "The printing press, developed by Johannes Gutenberg around 1440, made books far cheaper to "
        "produce. Within decades, printed books spread across Europe, helping literacy grow and "
        "allowing new ideas to travel quickly.",
        "Our company will switch to a new email system next month. All employees must attend a "
        "thirty-minute training session, and old messages will be moved automatically. The IT "
        "team will be available for questions during the first week.",
        "Coral reefs cover less than one percent of the ocean floor, yet they support about a "
        "quarter of all marine species. Rising sea temperatures cause corals to expel the algae "
        "that feed them, a process known as bleaching.",
        "The library is extending its opening hours during exam season. From May 1 to June 15 it "
        "will stay open until midnight on weekdays, and extra study rooms can be booked online.",
        "Cast iron pans last for generations if they are cared for. They should be dried right "
        "after washing and lightly oiled to prevent rust, and they get more non-stick with use."]}),
    T("sentiment", "extraction", "Classify the sentiment of this review as positive, negative or "
      "neutral, and explain why in one sentence: \"{t}\"", {"t": [
        "The pasta was cold and the waiter ignored us for twenty minutes.",
        "Absolutely loved this hotel, the staff went out of their way to help us.",
        "The phone works as described. Nothing special, but no problems either.",
        "Great battery life, but the screen scratches far too easily.",
        "I've read this book three times and it still makes me cry.",
        "Delivery took two weeks longer than promised and the box was damaged.",
        "It's an okay movie to watch on a lazy Sunday.",
        "Best coffee in town, and the pastries are fresh every morning.",
        "The course was useful, although the videos were a bit long."]}),
    T("extract-contacts", "extraction", "Pull out all email addresses and phone numbers from this "
      "message: \"{t}\"", {"t": [
        "Hi, it's Rachel. Call me at 555-0142 or email rachel.m@example.com about the party.",
        "For support write to help@shopfast.example or phone +44 20 7946 0321 on weekdays.",
        "Contact our office at (212) 555-0199. Questions about billing: billing@acme.example.",
        "You can reach Dev at dev.patel@mail.example, or his assistant at 555-0178.",
        "Bookings: 0161 496 0735 / events@riverside.example. Ask for Grace.",
        "Email both of us, jo@studio.example and kim@studio.example, or text 555-0110.",
        "Lost and found: call 555-0163 between 9 and 5, or write lost@museum.example."]}),
    T("to-table", "extraction", "Turn this information into a table: {t}", {"t": [
        "Anna is 34 and works as a nurse in Lyon; Ben is 28 and is a teacher in Leeds; Carla is 41 "
        "and works as an architect in Porto.",
        "Monday will be sunny with a high of 24°C, Tuesday cloudy with 19°C, and Wednesday rainy "
        "with 16°C.",
        "The red shirt costs $20 and comes in sizes S and M, the blue one costs $22 in M and L, and "
        "the green one costs $18 in S only.",
        "Flight BA117 leaves at 08:15 from gate 12, LH400 at 10:40 from gate 3, and AF22 at 13:05 "
        "from gate 7.",
        "Mercury takes 88 days to orbit the Sun, Venus 225 days, Earth 365 days and Mars 687 days.",
        "The team scored 3 goals in March, 5 in April, 2 in May and 6 in June.",
        "Oak trees can live 300 years, apple trees about 100 years, and birch trees around 60 years."]}),
    T("extract-keywords", "extraction", "Give me the five most important keywords from this text: \"{t}\"", {"t": [
        "Solar panels convert sunlight into electricity using photovoltaic cells made of silicon. "
        "Homeowners install them to lower energy bills and reduce their carbon footprint.",
        "The marathon starts at the harbor, passes the old cathedral and finishes in the city "
        "park. Runners must register online before the end of August.",
        "Machine learning models learn patterns from data. They need large, clean datasets, and "
        "their predictions should be checked for bias before deployment.",
        "Volunteers planted two hundred trees along the river to prevent erosion and give shade "
        "to walkers and wildlife.",
        "The recipe calls for flour, butter, sugar and eggs. Bake the cake at 180 degrees for forty "
        "minutes and let it cool before adding the chocolate glaze.",
        "Museums around the world are digitizing their collections so that students and "
        "researchers can study paintings and manuscripts online."]}),
    # ------------------------------------------------------------------------- science
    T("explain-simple", "science", "Explain {s} in simple terms.", {"s": [
        "why the sky is blue", "how photosynthesis works", "what causes the seasons",
        "how vaccines train the immune system", "what a black hole is", "how rainbows form",
        "why we have tides", "what DNA does", "how a lightning bolt forms", "what causes earthquakes",
        "how the heart pumps blood", "why ice floats on water"]}),
    T("sci-difference", "science", "What is the difference between {a} and {b}?", pairs=[
        ("a virus", "a bacterium"), ("weather", "climate"), ("speed", "velocity"),
        ("an element", "a compound"), ("mass", "weight"), ("a comet", "an asteroid"),
        ("mitosis", "meiosis"), ("heat", "temperature"), ("an acid", "a base"),
        ("nuclear fission", "nuclear fusion"),
    ], pair_keys=("a", "b")),
    T("how-works", "science", "How does {s} work?", {"s": [
        "a refrigerator", "a microwave oven", "GPS navigation", "a solar panel", "a wind turbine",
        "a touchscreen", "noise-cancelling technology", "an electric motor", "a thermometer",
        "the human eye", "a compass"]}),
    T("why-q", "science", "Why {s}?", {"s": [
        "do cats purr", "do leaves change color in autumn", "does bread rise", "do we yawn",
        "is the ocean salty", "do onions make you cry", "do stars twinkle", "do birds migrate",
        "does metal feel colder than wood at the same temperature", "do we get goosebumps",
        "does the Moon change shape during the month"]}),
    T("explain-to-age", "science", "Explain {s} to a {age}-year-old.", {
        "s": ["gravity", "electricity", "the water cycle", "how plants grow", "what atoms are",
              "why we need to sleep", "how the Internet works", "what germs are",
              "why the Moon shines at night"],
        "age": ["six", "ten"]}),
    T("what-if", "science", "What would happen if {s}?", {"s": [
        "the Moon disappeared", "Earth stopped spinning", "all the bees died out",
        "humans could photosynthesize", "the ice caps melted completely", "there was no friction",
        "the Sun suddenly became twice as bright", "we lost all our mosquitoes",
        "Earth had two moons"]}),
    T("life-cycle", "science", "Describe the life cycle of {s}.", {"s": [
        "a butterfly", "a frog", "a star like the Sun", "a sunflower", "a salmon", "a mosquito",
        "a fern", "an oak tree", "a honeybee"]}),
    T("organ-function", "science", "What are the main jobs of the {s} in the human body?", {"s": [
        "liver", "kidneys", "lungs", "skin", "small intestine", "spleen", "pancreas",
        "thyroid gland", "spinal cord"]}),
    # ------------------------------------------------------------------------- humanities
    T("causes-of", "humanities", "What were the main causes of {s}?", {"s": [
        "the First World War", "the French Revolution", "the fall of the Western Roman Empire",
        "the Great Depression", "the American Civil War", "the Industrial Revolution in Britain",
        "the end of the Cold War", "the Protestant Reformation", "the Russian Revolution of 1917"]}),
    T("who-was", "humanities", "Who was {s}? Explain why they are still remembered today.", {"s": [
        "Marie Curie", "Leonardo da Vinci", "Nelson Mandela", "Cleopatra", "Confucius",
        "Mahatma Gandhi", "Ada Lovelace", "Frida Kahlo", "Genghis Khan", "Ibn Battuta",
        "Harriet Tubman"]}),
    T("philosophy", "humanities", "Explain the philosophical idea of {s} and give an everyday example.", {"s": [
        "utilitarianism", "the social contract", "stoicism", "existentialism",
        "the trolley problem", "Plato's allegory of the cave", "Occam's razor",
        "free will versus determinism", "the veil of ignorance"]}),
    T("compare-hum", "humanities", "Compare {a} and {b}: what do they have in common, and how do they differ?", pairs=[
        ("ancient Athens", "Sparta"), ("Impressionism", "Expressionism"),
        ("Baroque music", "Classical-era music"), ("the Renaissance", "the Enlightenment"),
        ("Buddhism", "Hinduism"), ("the Roman Republic", "the Roman Empire"),
        ("Romanticism", "Realism in literature"), ("the Aztec", "the Inca empires"),
        ("Gothic", "Romanesque architecture"),
    ], pair_keys=("a", "b")),
    T("plot-themes", "humanities", "What are the main themes of {s}?", {"s": [
        "Shakespeare's Romeo and Juliet", "George Orwell's 1984", "Mary Shelley's Frankenstein",
        "Harper Lee's To Kill a Mockingbird", "Homer's Odyssey", "Jane Austen's Pride and Prejudice",
        "Antoine de Saint-Exupery's The Little Prince", "Herman Melville's Moby-Dick",
        "F. Scott Fitzgerald's The Great Gatsby"]}),
    T("daily-life", "humanities", "What was daily life like for {s}?", {"s": [
        "a child in ancient Rome", "a peasant in medieval France", "a samurai in Edo-period Japan",
        "a sailor in the 1700s", "a student at a medieval university", "a family in Victorian London",
        "a farmer in ancient Egypt", "a merchant in Renaissance Venice", "a pioneer on the Oregon Trail"]}),
    T("significance", "humanities", "Why is {s} considered so important?", {"s": [
        "the Magna Carta", "the invention of writing", "the Rosetta Stone", "the Silk Road",
        "the printing press", "the Universal Declaration of Human Rights", "the Great Library of Alexandria",
        "the Moon landing in 1969", "the fall of the Berlin Wall"]}),
    T("art-movement", "humanities", "Describe the main features of {s} and name two well-known examples.", {"s": [
        "Cubism", "Gothic cathedrals", "Japanese ukiyo-e prints", "Art Nouveau", "Surrealism",
        "Renaissance painting", "jazz music", "Greek tragedy", "haiku poetry"]}),
    # ------------------------------------------------------------------------- advice
    T("how-can-i", "advice", "How can I {s}?", {"s": [
        "improve my sleep", "save money on groceries", "stop procrastinating", "make new friends in a new city",
        "become a better public speaker", "keep my houseplants alive", "remember names better",
        "reduce screen time in the evening", "stay calm before a job interview", "learn to cook simple meals"]}),
    T("tips-for", "advice", "Give me {n} practical tips for {s}.", {
        "n": ["three", "five"],
        "s": ["a first trip abroad", "studying for exams", "running a productive meeting",
              "staying healthy during winter", "writing a good CV", "traveling with a toddler",
              "moving to a new apartment", "keeping a tidy kitchen", "learning to swim as an adult",
              "working night shifts"]}),
    T("pack-for", "advice", "What should I pack for {s}?", {"s": [
        "a weekend camping trip", "a beach holiday", "a business trip to a cold city",
        "a long-haul flight", "a hiking trip in the mountains", "a music festival", "a ski trip",
        "a week-long train journey"]}),
    T("recipe-with", "advice", "Suggest a simple {meal} I can make with {ing}.", pairs=[
        ("breakfast", "eggs, spinach and cheese"), ("dinner", "rice, beans and tomatoes"),
        ("dinner", "pasta, garlic and lemon"), ("dinner", "potatoes, onions and sausages"),
        ("breakfast", "oats, bananas and peanut butter"), ("lunch", "chickpeas, yogurt and cucumber"),
        ("lunch", "tortillas, chicken and peppers"), ("dinner", "noodles, tofu and broccoli"),
        ("lunch", "bread, tomatoes and mozzarella"),
    ], pair_keys=("meal", "ing")),
    T("politely", "advice", "How do I politely {s}?", {"s": [
        "decline a wedding invitation", "ask my neighbor to keep the noise down",
        "tell a friend I can't lend them money", "leave a conversation that goes on too long",
        "remind a coworker about a task they forgot", "ask for a raise",
        "say no to extra work from my boss", "end a phone call with a chatty relative"]}),
    # ------------------------------------------------------------------------- brainstorming
    T("ideas-for", "brainstorming", "Give me {n} ideas for {s}.", {
        "n": ["five", "ten"],
        "s": ["a ten-year-old's birthday party", "a rainy weekend at home", "a team-building day",
              "a science fair project", "a small business I could start from home",
              "a cheap first date", "a short story set in a museum", "using leftover rice",
              "decorating a small bedroom"]}),
    T("name-ideas", "brainstorming", "Suggest some names for {s}.", {"s": [
        "a coffee shop near a university", "a golden retriever puppy", "a fantasy kingdom",
        "a podcast about history", "a family board game night", "a vegetarian food truck",
        "a robot in a children's book", "a hiking club"]}),
    T("fun-things", "brainstorming", "What are some fun things to do {s}?", {"s": [
        "on a snowy day", "in a small town with no cinema", "with grandparents", "on a long car trip",
        "at the beach when it's cloudy", "on a budget in a big city", "with a group of teenagers",
        "on a summer evening"]}),
]


ONE_OFFS: dict[str, list[str]] = {
    "writing": [
        "Write a letter from a cat to its owner complaining about the new dog.",
        "Write a two-sentence horror story.",
        "Describe a sunset without using the words 'red', 'orange' or 'sun'.",
        "Write a short dialogue between a coffee cup and a teapot arguing about which is better.",
        "Write a recipe for happiness in the style of a cookbook.",
        "Write an apology note from a dog who ate the homework.",
        "Write a motivational message for someone starting their first job tomorrow.",
        "Write a bedtime story about a cloud that was afraid of heights.",
        "Write a short review of an imaginary restaurant that only serves breakfast.",
        "Write an acrostic poem using the word OCEAN.",
    ],
    "roleplay": [
        "You are a grumpy but kind old librarian. A child asks you where the dinosaur books are. Respond in character.",
        "Pretend you are Sherlock Holmes and deduce something about me from the fact that I wrote to you at 3 a.m.",
        "You are a customer service agent for an airline. I missed my connecting flight. Help me.",
        "Act as a medieval town crier announcing the arrival of the internet.",
        "You are an alien visiting Earth for the first time. Describe a supermarket.",
        "Role-play as my Spanish teacher and teach me how to order food in a restaurant.",
        "You are a sports commentator. Narrate me making a cup of tea as if it were a world championship final.",
        "Pretend to be a travel agent in the year 2200 selling holidays on the Moon.",
    ],
    "reasoning": [
        "A farmer has 17 sheep and all but 9 run away. How many sheep does the farmer have left?",
        "If it takes 5 machines 5 minutes to make 5 widgets, how long would it take 100 machines to make 100 widgets?",
        "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does the ball cost?",
        "I have two coins that add up to 30 cents, and one of them is not a nickel. What are the two coins?",
        "Three friends split a restaurant bill. Is it fairer to split it equally or by what each person ordered? Argue both sides.",
        "You have a 3-liter jug and a 5-liter jug. How can you measure exactly 4 liters of water?",
        "A clock shows 3:15. What is the angle between the hour and minute hands?",
        "If some cats are black and all black things are visible at night, can we conclude that some cats are visible at night?",
        "Mary's father has five daughters: Nana, Nene, Nini, Nono. What is the name of the fifth daughter?",
        "Is the statement 'This sentence is false' true or false? Explain the paradox.",
    ],
    "math": [
        "What is the sum of all the whole numbers from 1 to 100?",
        "Is 221 a prime number? Explain how you checked.",
        "How many minutes are there in a week?",
        "What is the probability of getting exactly one head when flipping two coins?",
        "Explain why any number multiplied by zero is zero.",
        "If a pizza is cut into 8 slices and I eat 3, what fraction of the pizza is left?",
        "What is the square root of 144, and how do you know?",
        "A rectangle has a perimeter of 30 cm and its length is twice its width. What are its dimensions?",
        "Explain the difference between a permutation and a combination with an example.",
        "What is 2 to the power of 10?",
    ],
    "coding": [
        "What is the output of print(3 * '7') in Python, and why?",
        "Write a bash one-liner that counts the number of lines in all .txt files in a folder.",
        "Explain what a race condition is and how to avoid one.",
        "Write a regular expression that matches a US ZIP code.",
        "What does the git rebase command do, and when should I avoid it?",
        "Write a Python class called Stack with push, pop and is_empty methods.",
        "Why is it a bad idea to store passwords in plain text? How should they be stored?",
        "Write a simple HTML page with a heading, a paragraph and a button.",
        "What is the difference between a stack and a queue? Give a real-world example of each.",
        "Explain what this command does: ls -la | grep '.py' | wc -l",
    ],
    "extraction": [
        "From the sentence 'The meeting with Acme Corp is on Thursday at 2 pm in room 4B', extract the company, day, time and room.",
        "Here is a shopping list: '2 apples, a loaf of bread, 3 cans of tuna, milk'. Count the total number of items.",
        "Identify the verbs in this sentence: 'The children ran to the park, laughed loudly and climbed the old tree.'",
        "What city and country is this address in? '221B Baker Street, London NW1 6XE, United Kingdom'",
        "Which ingredients in this list are vegetables? 'carrots, chicken, rice, broccoli, cheese, peppers'",
        "Read this and tell me who won: 'In a close final, the Tigers beat the Eagles 3-2 after extra time.'",
        "Convert this sentence into a bullet list of tasks: 'Tomorrow I need to call the bank, buy groceries, pick up Sam from school and finish my essay.'",
        "Find the spelling mistakes in this sentence: 'I recieved the pacakge yesterday and it was definately worth the wait.'",
    ],
    "science": [
        "Why can't we see stars during the day?",
        "Is a tomato a fruit or a vegetable? Explain the scientific answer.",
        "How long does light from the Sun take to reach Earth?",
        "Why do astronauts float on the International Space Station?",
        "What is the largest organ in the human body?",
        "How do noise and sound differ from a physics point of view?",
        "Why does salt melt ice on roads in winter?",
        "How do fish breathe underwater?",
        "What is the greenhouse effect, and why does it matter?",
        "How do scientists know how old a fossil is?",
    ],
    "humanities": [
        "Why did the Titanic sink?",
        "What is the difference between a myth and a legend?",
        "Why do many languages have similar words for 'mother'?",
        "What are the seven wonders of the ancient world?",
        "How did the Olympic Games begin?",
        "What is the meaning of the phrase 'carpe diem', and where does it come from?",
        "Why is Shakespeare still read and performed today?",
        "What did the Renaissance change about how people saw the world?",
        "How did the ancient Egyptians build the pyramids, according to historians?",
        "What is the difference between a democracy and a republic?",
    ],
    "advice": [
        "My friend forgot my birthday. Should I say something?",
        "I have 20 minutes for lunch every day. What are some quick healthy options?",
        "How should I prepare the night before a big exam?",
        "What questions should I ask when viewing an apartment to rent?",
        "I want to start reading more. Can you recommend a few classic novels for a beginner?",
        "How do I make a monthly budget?",
        "What is a good way to learn the basics of photography?",
        "My roommate never does the dishes. How can I bring it up without a fight?",
    ],
    "brainstorming": [
        "Invent a new holiday and describe how people would celebrate it.",
        "Suggest three unusual uses for an old ladder.",
        "Come up with a plot idea for a movie about a talking city bus.",
        "What are some creative ways to reuse glass jars?",
        "Invent a new sport that can be played in a small apartment.",
        "Suggest five themes for a school art exhibition.",
    ],
}


# ---------------------------------------------------------------- the wide training set
# Train-only frames (none is a dev frame; `dev_clash` checks every prompt they make): more of each
# training template's fills, plus these, make `prompts_train_wide.jsonl` (see `build_wide`).
def _budget(r):
    name, total = r.choice(NAMES), r.choice([300, 450, 800, 1200, 2000, 2500])
    rent = r.choice([30, 35, 40, 45, 50])
    return (f"{name} earns ${total} a month and spends {rent}% on rent and ${r.randint(5, 25) * 10} on "
            f"food. How much is left? Show the calculation.")


def _recipe_scale(r):
    serves, want = r.choice([2, 4, 6]), r.choice([3, 5, 8, 10, 12])
    amount, unit, what = r.choice([(200, "g", "flour"), (3, "", "eggs"), (250, "ml", "milk"),
                                   (150, "g", "sugar"), (2, "tablespoons of", "butter")])
    return (f"A recipe for {serves} people uses {amount} {unit} {what}. How much {what} do I need "
            f"for {want} people?").replace("  ", " ")


def _interest(r):
    p, rate, years = r.choice([500, 1000, 2500, 10000]), r.choice([2, 3, 4, 5, 6, 8]), r.randint(2, 10)
    kind = r.choice(["simple", "compound (yearly)"])
    return f"How much is ${p} worth after {years} years at {rate}% {kind} interest?"


def _dice(r):
    ask = r.choice(["a sum of 7", "two sixes", "at least one six", "an even total", "a double",
                    "a sum greater than 9"])
    return f"I roll two fair dice. What is the probability of getting {ask}? Explain how you count."


def _mean(r):
    xs = [r.randint(1, 60) for _ in range(r.randint(5, 8))]
    return r.choice([f"Find the mean, median and mode of {', '.join(map(str, xs))}.",
                     f"What is the average of {', '.join(map(str, xs))}?"])


def _clock(r):
    h, m, d = r.randint(1, 11), r.choice([0, 15, 20, 30, 45, 50]), r.choice([75, 95, 130, 200, 345])
    return (f"A movie starts at {h}:{m:02d} pm and lasts {d} minutes. What time does it end?")


WIDE_TEMPLATES: list[T | G] = [
    G("budget", "math", _budget), G("recipe-scale", "math", _recipe_scale),
    G("interest", "math", _interest), G("dice", "math", _dice), G("mean", "math", _mean),
    G("clock", "reasoning", _clock),
    T("convince", "writing", "Write a short paragraph convincing {who} to {what}.", {
        "who": ["my roommate", "my parents", "a busy manager", "a group of teenagers", "my neighbor",
                "the city council"],
        "what": ["recycle more", "adopt a rescue dog", "take a vacation", "learn to swim",
                 "plant trees in the park", "try a vegetarian meal once a week", "read more fiction",
                 "start a book club"]}),
    T("dialogue", "writing", "Write a short dialogue between {a} and {b} about {s}.", {
        "a": ["a teacher", "a grandmother", "a robot", "a detective", "a farmer", "a chef"],
        "b": ["a student", "her grandson", "a child", "a witness", "a city tourist", "a food critic"],
        "s": ["the weather", "a missing key", "the future", "a strange noise at night",
              "their favorite food", "a lost wallet"]}),
    T("review", "writing", "Write a {len} review of {s}.", {
        "len": ["short", "balanced", "two-paragraph", "humorous"],
        "s": ["a new pizza place downtown", "a mystery novel you could not put down",
              "a budget smartphone", "a rainy camping trip", "a science museum", "a wireless keyboard",
              "a cooking class", "a family-friendly hotel", "a board game night"]}),
    T("letter-to", "writing", "Write a letter to {who} {why}.", {
        "who": ["my future self", "my childhood best friend", "the mayor", "a favorite author",
                "my grandmother", "a new neighbor"],
        "why": ["about what I learned this year", "asking for advice", "saying thank you",
                "describing my new city", "sharing some good news"]}),
    T("story-prompt", "writing", "Tell a story about {s} in {n} sentences.", {
        "s": ["a dragon who is afraid of fire", "a town where it never stops snowing",
              "a robot learning to cook", "two rival bakers", "a message in a bottle",
              "a time traveler stuck in 1920", "a kid who finds a map in the attic",
              "a garden that grows overnight"],
        "n": ["five", "six", "eight", "ten"]}),
    T("describe-place", "writing", "Describe {s} using all five senses.", {"s": [
        "a busy market in the morning", "a beach at sunset", "a bakery before dawn",
        "a forest after rain", "a crowded subway car", "a farm in summer", "a snowy mountain cabin",
        "a stadium on game night", "a quiet library", "a night market in Bangkok"]}),
    T("invitation", "writing", "Write an invitation for {s}.", {"s": [
        "a surprise birthday party", "a neighborhood cleanup day", "a company picnic",
        "a baby shower", "a charity bake sale", "a game night", "a housewarming party",
        "a book launch", "a school reunion", "an open day at a pottery studio"]}),
    T("summarize-for", "extraction", "Summarize the main points of this text for {who}: \"{text}\"", {
        "who": ["a busy manager", "a ten-year-old", "a newspaper headline", "a tweet"],
        "text": ["The city will close the Elm Street bridge for repairs from June 3 to August 20. "
                 "Buses will take a detour via Oak Avenue, and cyclists can use the ferry for free.",
                 "Our quarterly sales rose 12 percent, mostly from online orders, while store visits "
                 "fell slightly. We plan to open two pickup points and hire five more drivers.",
                 "Researchers found that people who walked for 20 minutes after dinner had lower blood "
                 "sugar the next morning than those who rested, although the effect was small.",
                 "The library is extending its hours on weekdays until 9 pm and will start lending "
                 "board games and laptops to members from next month."]}),
    T("classify", "extraction", "Classify each of these into {cats}: {items}.", pairs=[
        ("fruit or vegetable", "tomato, carrot, apple, cucumber, banana, spinach"),
        ("mammal, bird or reptile", "bat, penguin, lizard, whale, eagle, turtle"),
        ("renewable or non-renewable energy", "wind, coal, solar, natural gas, hydro, oil"),
        ("noun, verb or adjective", "run, happy, table, quickly, sing, blue"),
        ("solid, liquid or gas", "ice, steam, honey, oxygen, sand, milk"),
        ("input or output device", "keyboard, monitor, mouse, printer, microphone, speaker")],
        pair_keys=("cats", "items")),
    T("fix-grammar", "extraction", "Correct the grammar and spelling in this text: \"{text}\"", {"text": [
        "Me and him goes to the store yesterday and buyed three apple.",
        "Their going to the park after they finishes there homework.",
        "The informations you sended me was very usefull, thank you alot.",
        "She dont like when peoples is late to the meeting.",
        "We was suppose to meet at noon but the bus were late.",
        "Its been raining all week so the river have flooded.",
        "I has never saw a movie so boring like that one."]}),
    T("py-task", "coding", "Write a Python {kind} that {task}.", {
        "kind": ["function", "script", "class"],
        "task": ["counts the words in a text file", "checks whether a string is a palindrome",
                 "merges two sorted lists", "converts Celsius to Fahrenheit",
                 "finds the most common element in a list", "validates an email address",
                 "removes duplicates from a list while keeping order", "flattens a nested list",
                 "reads a CSV file and prints the average of a column", "generates a random password",
                 "checks whether a year is a leap year", "computes the factorial of a number"]}),
    T("other-lang", "coding", "Write a {lang} program that {task}.", {
        "lang": ["C", "Go", "Java", "Rust", "TypeScript", "Bash"],
        "task": ["prints the numbers from 1 to 100", "reverses a string", "reads a line and greets the user",
                 "sums the numbers in an array", "prints the multiplication table of 7",
                 "counts the vowels in a word"]}),
    T("code-review", "coding", "How could I improve this {lang} code?\n```{tag}\n{code}\n```", pairs=[
        ("Python", "python", "def avg(l):\n    s = 0\n    for i in range(len(l)):\n        s = s + l[i]\n    return s / len(l)"),
        ("Python", "python", "result = []\nfor x in data:\n    if x % 2 == 0:\n        result.append(x * x)"),
        ("JavaScript", "javascript", "function getNames(users) {\n  var names = [];\n  for (var i = 0; i < users.length; i++) {\n    names.push(users[i].name);\n  }\n  return names;\n}"),
        ("Python", "python", "f = open('data.txt')\nlines = f.readlines()\nprint(len(lines))"),
        ("SQL", "sql", "SELECT * FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE country = 'FR');"),
        ("Python", "python", "def is_prime(n):\n    for i in range(2, n):\n        if n % i == 0:\n            return False\n    return True")],
        pair_keys=("lang", "tag", "code")),
    T("what-is-tech", "coding", "What is {s}, and when would I use it?", {"s": [
        "a linked list", "a Docker container", "a virtual environment in Python", "a message queue",
        "a binary search tree", "a database index", "a lambda function", "a Git rebase",
        "a regular expression", "an API key", "a cache", "a load balancer", "a unit test",
        "a stack", "a decorator in Python", "a foreign key"]}),
    T("history-event", "humanities", "Tell me about {s}. What happened, and what changed afterwards?", {"s": [
        "the fall of the Berlin Wall", "the signing of the Magna Carta", "the Black Death",
        "the invention of the telephone", "the first Olympic Games", "the construction of the Great Wall",
        "the voyage of the Mayflower", "the California Gold Rush", "the partition of India",
        "the launch of Sputnik", "the building of the Panama Canal", "the eruption of Vesuvius in 79 AD"]}),
    T("culture-food", "humanities", "What is the story behind {s}?", {"s": [
        "sushi", "the croissant", "tea ceremonies in Japan", "Mexican Day of the Dead",
        "the Chinese New Year", "pizza", "chocolate", "Halloween", "the Olympic flame",
        "Valentine's Day", "the tango", "Oktoberfest"]}),
    T("book-recommend", "humanities", "Recommend {n} books for someone who enjoyed {s}, and say why.", {
        "n": ["three", "four", "five"],
        "s": ["The Hobbit", "Pride and Prejudice", "The Martian", "Sapiens", "Harry Potter",
              "To Kill a Mockingbird", "The Little Prince", "Dune"]}),
    T("compare-things", "science", "Compare {a} and {b}: how are they similar and how are they different?", pairs=[
        ("viruses", "bacteria"), ("weather", "climate"), ("mitosis", "meiosis"), ("AC", "DC current"),
        ("comets", "asteroids"), ("frogs", "toads"), ("alligators", "crocodiles"), ("speed", "velocity"),
        ("evaporation", "boiling"), ("an atom", "a molecule"), ("hurricanes", "tornadoes"),
        ("arteries", "veins")], pair_keys=("a", "b")),
    T("how-do", "science", "How do {s}?", {"s": [
        "birds know where to migrate", "vaccines train the immune system", "airplanes stay in the air",
        "plants know which way is up", "submarines dive and surface", "bats find food in the dark",
        "refrigerators keep food cold", "glaciers move", "fireflies glow", "noise-cancelling headphones work",
        "our ears keep our balance", "chameleons change color", "microwaves heat food",
        "scientists measure the age of rocks"]}),
    T("fact-check", "science", "Is it true that {s}? Explain what the evidence says.", {"s": [
        "we only use 10% of our brains", "lightning never strikes the same place twice",
        "goldfish have a three-second memory", "cracking your knuckles causes arthritis",
        "the Great Wall of China is visible from space", "bats are blind",
        "sugar makes children hyperactive", "humans have five senses", "bulls hate the color red",
        "you lose most of your body heat through your head"]}),
    T("plan-for", "advice", "Make me a {span} plan to {goal}.", {
        "span": ["one-week", "30-day", "three-month", "weekend"],
        "goal": ["learn basic Spanish", "run my first 5K", "clean out my garage", "eat more vegetables",
                 "save $500", "read three books", "get better at drawing", "prepare for a math exam",
                 "build a morning routine", "learn to play the ukulele"]}),
    T("should-i", "advice", "Should I {a} or {b}? Help me think it through.", pairs=[
        ("rent", "buy a house"), ("take a gap year", "go straight to university"),
        ("learn Python", "learn JavaScript first"), ("buy an electric car", "keep my old car"),
        ("work at a startup", "join a big company"), ("get a cat", "get a dog"),
        ("study abroad", "study at home"), ("take the bus", "cycle to work")], pair_keys=("a", "b")),
    T("what-do-i", "advice", "What should I do if {s}?", {"s": [
        "my laptop gets wet", "I lock myself out of my house", "my coworker takes credit for my work",
        "I miss my connecting flight", "my bread does not rise", "a friend keeps cancelling plans",
        "I get a flat tire on the highway", "my phone is stolen", "I feel burned out",
        "my neighbor's music is too loud at night", "I forget an important birthday",
        "my houseplant's leaves turn yellow"]}),
    T("list-of", "brainstorming", "List {n} {what}.", {
        "n": ["five", "seven", "ten"],
        "what": ["questions to ask on a first date", "ways to reduce plastic waste at home",
                 "cheap hobbies to try this year", "team names for a trivia night",
                 "things to do on a long train ride", "ways to celebrate a small win at work",
                 "conversation starters for a networking event", "indoor games for a rainy day",
                 "healthy snacks for a road trip", "fun facts about octopuses"]}),
    T("themes-for", "brainstorming", "Brainstorm {n} themes for {s}.", {
        "n": ["five", "eight", "ten"],
        "s": ["a costume party", "a photography contest", "a school dance", "a wedding",
              "a company retreat", "a children's summer camp", "a restaurant menu", "a music festival"]}),
    T("riddle", "reasoning", "Solve this riddle and explain your answer: {s}", {"s": [
        "What has keys but can't open locks?", "What gets wetter the more it dries?",
        "What has a neck but no head?", "What can travel around the world while staying in a corner?",
        "The more you take, the more you leave behind. What am I?",
        "What has hands but cannot clap?", "What comes down but never goes up?",
        "What has one eye but cannot see?"]}),
    T("estimate", "reasoning", "Estimate {s}. Walk me through your reasoning.", {"s": [
        "how many piano tuners work in Chicago", "how many golf balls fit in a school bus",
        "how many words you speak in a year", "how much water a family of four uses in a day",
        "how many trees are in Central Park", "how many slices of pizza are eaten in a city of a million people each day",
        "how long it would take to walk around the Earth", "how many books fit in an average bookshelf"]}),
    T("argument-flaw", "reasoning", "What is wrong with this argument? \"{s}\"", {"s": [
        "Every time I wash my car it rains, so washing my car makes it rain.",
        "Most successful people wake up early, so waking up early will make me successful.",
        "This medicine is natural, so it must be safe.",
        "Nobody has proven that ghosts don't exist, so they must exist.",
        "My grandfather smoked and lived to 95, so smoking is not harmful.",
        "If we allow students to use phones at lunch, soon they will use them in every class."]}),
    T("act-as", "roleplay", "Act as {who}. {task}", pairs=[
        ("a fitness coach", "Design a warm-up routine for me before a morning run."),
        ("a travel agent", "Plan a three-day trip to Lisbon for a couple on a budget."),
        ("a career counselor", "Ask me three questions to find out what job suits me."),
        ("a Socratic tutor", "Help me understand why the sky is blue by asking me questions."),
        ("a sommelier", "Suggest a drink to go with a mushroom risotto."),
        ("a librarian", "Help me pick a book for a long flight."),
        ("a game master", "Start a short fantasy adventure and give me three choices."),
        ("a language tutor", "Teach me five useful phrases in Italian for a restaurant."),
        ("a gardener", "Tell me what to plant this spring in a small shady yard."),
        ("a tech support agent", "My printer says it is offline. Guide me step by step.")],
        pair_keys=("who", "task")),
    T("interview-me", "roleplay", "Pretend you are {who} giving an interview. What would you say about {s}?", pairs=[
        ("a famous chef", "your first restaurant"), ("an Olympic swimmer", "your training"),
        ("a deep-sea explorer", "the strangest creature you have seen"),
        ("an astronaut back from Mars", "the journey home"), ("a mountain guide", "a dangerous climb"),
        ("a zookeeper", "your favorite animal"), ("a bestselling novelist", "writer's block")],
        pair_keys=("who", "s")),
]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def build(seed: int = SEED) -> list[dict]:
    """All prompt records, deterministic for `seed`, deduplicated, each template capped."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []

    def add(template: str, category: str, text: str) -> bool:
        if _norm(text) in seen:
            return False
        seen.add(_norm(text))
        records.append({"category": category, "template": template, "prompt": text})
        return True

    for t in TEMPLATES:
        n = 0
        for text in t.candidates(rng):
            n += add(t.id, t.category, text)
            if n == PER_TEMPLATE:
                break
    for category, texts in ONE_OFFS.items():
        for i, text in enumerate(texts, 1):
            assert add(f"oneoff-{category}-{i:02d}", category, text), f"duplicate one-off: {text!r}"
    return records


def split(records: list[dict], seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, dev): per category, whole templates go to dev until it holds ~DEV_SHARE of it."""
    rng = random.Random(seed + 1)
    by_cat: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_cat[r["category"]][r["template"]].append(r)
    dev_templates: set[str] = set()
    for category, groups in sorted(by_cat.items()):
        target = round(DEV_SHARE * sum(len(g) for g in groups.values()))
        # Templates in random order; one that would overshoot the target is skipped in favour
        # of smaller ones (one-offs), and every category keeps at least one training template.
        order = sorted(groups)
        rng.shuffle(order)
        n_dev = 0
        for tid in order:
            if n_dev >= target:
                break
            fits = n_dev + len(groups[tid]) <= target + 2
            if fits and len(dev_templates & set(groups)) < len(groups) - 1:
                dev_templates.add(tid)
                n_dev += len(groups[tid])
    train = [r for r in records if r["template"] not in dev_templates]
    dev = [r for r in records if r["template"] in dev_templates]
    return train, dev


def dev_clash(prompt: str, dev: list[str]) -> bool:
    """The same text as a dev prompt, or its first four or last three words (a dev frame)."""
    w = _norm(prompt).split()
    for d in dev:
        dw = _norm(d).split()
        if w == dw or w[:4] == dw[:4] or (len(w) >= 3 and w[-3:] == dw[-3:]):
            return True
    return False


def build_wide(train: list[dict], dev: list[dict], self_written: list[dict],
               seed: int = SEED) -> list[dict]:
    """The wide training set: `train`, then up to WIDE_PER_TEMPLATE prompts (WIDE_PER_GENERATOR
    for a generator) from every training template and every train-only frame (`WIDE_TEMPLATES`),
    then the target's own prompts. Dev templates give nothing; no added prompt may `dev_clash`."""
    rng = random.Random(seed + 10)
    dev_templates = {r["template"] for r in dev}
    dev_texts = [r["prompt"] for r in dev]
    seen = {_norm(r["prompt"]) for r in train + dev}
    per = Counter(r["template"] for r in train)
    out = list(train)
    for t in [t for t in TEMPLATES if t.id not in dev_templates] + WIDE_TEMPLATES:
        cap = WIDE_PER_GENERATOR if isinstance(t, G) else WIDE_PER_TEMPLATE
        for text in t.candidates(rng, cap * 6):
            if per[t.id] >= cap:
                break
            if _norm(text) in seen or dev_clash(text, dev_texts):
                continue
            seen.add(_norm(text))
            per[t.id] += 1
            out.append({"category": t.category, "template": t.id, "prompt": text})
    for r in self_written:
        if _norm(r["prompt"]) not in seen and not dev_clash(r["prompt"], dev_texts):
            seen.add(_norm(r["prompt"]))
            out.append({"category": r["category"], "template": r["template"], "prompt": r["prompt"]})
    return out


def read_self_written(data_dir: Path = OUT_DIR) -> list[dict]:
    path = data_dir / SELF_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def render(seed: int = SEED, data_dir: Path = OUT_DIR) -> dict[str, str]:
    """{file name: jsonl text} for both parts, records shuffled (a trainer reading a file front
    to back sees mixed categories) and numbered `train-0000`, `dev-0000`, ..."""
    train, dev = split(build(seed), seed)
    check(train, dev)
    wide = build_wide(train, dev, read_self_written(data_dir), seed)
    check(wide, dev, WIDE_MAX_SHARE)
    rng = random.Random(seed + 2)
    out = {}
    for name, part, width in (("train", train, 4), ("dev", dev, 4), ("train_wide", wide, 5)):
        part = list(part)
        rng.shuffle(part)
        out[f"prompts_{name}.jsonl"] = "".join(
            json.dumps({"id": f"{name.replace('_', '-')}-{i:0{width}d}", **r}, ensure_ascii=False) + "\n"
            for i, r in enumerate(part))
    return out


def check(train: list[dict], dev: list[dict], max_share: float = MAX_SHARE) -> None:
    """The set's invariants (also tested in tests/test_prompts.py)."""
    everything = train + dev
    per_template = Counter(r["template"] for r in everything)
    tid, n = per_template.most_common(1)[0]
    assert n <= max_share * len(everything), f"template {tid} has {n}/{len(everything)} prompts"
    assert not {r["template"] for r in train} & {r["template"] for r in dev}, "train/dev share a template"
    assert len({_norm(r["prompt"]) for r in everything}) == len(everything), "duplicate prompts"
    assert {r["category"] for r in dev} == {r["category"] for r in train}, "dev lacks a category"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (args.out_dir / name).write_text(text, encoding="utf-8")
        print(f"wrote {len(text.splitlines())} prompts to {args.out_dir / name}")
    train, dev = split(build())
    cats = sorted({r["category"] for r in train + dev})
    for c in cats:
        print(f"  {c:14s} train {sum(r['category'] == c for r in train):4d}  "
              f"dev {sum(r['category'] == c for r in dev):3d}")
    print(f"  {len({r['template'] for r in train + dev})} templates "
          f"(max {Counter(r['template'] for r in train + dev).most_common(1)[0][1]} prompts each)")
    wide = build_wide(train, dev, read_self_written())
    by = Counter(r["template"].startswith("self-") for r in wide)
    print(f"  wide training set: {len(wide)} prompts, {len({r['template'] for r in wide})} templates "
          f"({by[True]} written by the target)")


if __name__ == "__main__":
    main()
