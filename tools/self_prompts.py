"""Prompts the target writes itself, from seed topics: `spec_compiler/data/prompts_self.jsonl`.

The templated prompts (tools/make_prompts.py) are one author's sentence frames; a draft trained
only on their continuations learns those frames. Here the target is asked, for each seed topic,
to write a request a user might send it (three kinds of ask, several samples each, sampled at
`TEMPERATURE` from a fixed seed), and its answers, cleaned and filtered, become training prompts.

- Training only. Every record's template is `self-<ask>:<topic>`, a frame no dev prompt uses
  (one per ask and topic, so no one of them dominates the wide set), and a
  written prompt is dropped if it repeats a dev prompt or shares a dev prompt's opening or closing
  words (`make_prompts.dev_clash`), so the dev split stays apart by template as before.
- Cleaning keeps the first line of the answer, strips labels and quotes, and keeps requests of
  4-60 words that end like a request; duplicates (case and spacing folded) are dropped, also
  against the templated set.
- The committed file is what this script wrote once, on the CPU, from SmolLM2-135M-Instruct with
  `--samples 4` (1,860 asks, 389 kept); sampling on another machine or torch build may pick other
  tokens, so it is reproducible only approximately (the data are committed). tools/make_prompts.py
  adds these prompts to the wide training set.

    python tools/self_prompts.py MODEL_DIR [--samples 3] [--out spec_compiler/data/prompts_self.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "spec_compiler" / "data"
SEED = 20261130
TEMPERATURE = 0.7
MAX_NEW_TOKENS = 56

# Two ways of asking, after trying several on SmolLM2-135M-Instruct (an instruction to "write a
# request" mostly got the assistant chatting about the instruction instead):
# - questions: the chat instruction, with the answer begun for it ("Here is a question about
#   TOPIC:"), so the next line is the question itself;
# - requests and how-to instructions: a completion of a numbered list of requests "users sent",
#   two examples on other topics, then the target writes the third (the topic check below keeps
#   only the on-topic ones; the examples pull many off topic).
QUESTION = ("Write one question someone might ask about {topic}.", "Here is a question about {topic}:\n\n")
LEAD = "Here are {kind} that users sent to a helpful AI assistant about {topic}.\n\n"
ASKS = {
    "question": None,
    "task": ("requests", [
        "Write a polite message to my neighbor asking him to move his car from my driveway.",
        "Help me write a short bio for my pottery website.",
        "Translate 'Where is the train station?' into French and German.",
        "Draft a two-minute speech for my sister's graduation party.",
        "Create a weekly chore chart for a family of four.",
        "Turn these notes into a short summary: meeting moved to Friday, budget approved, hire two interns."]),
    "list": ("instructions asking for lists, plans or step-by-step directions", [
        "List five ways to keep a small apartment cool in summer without air conditioning.",
        "Give me a step-by-step guide to changing a bicycle tire.",
        "Make a packing list for a three-day camping trip.",
        "Plan a one-day itinerary for a first visit to Rome.",
        "Explain, step by step, how to make a cup of pour-over coffee.",
        "Suggest a four-week plan for learning to touch type."]),
}

TOPICS = {
    "advice": [
        "saving money on groceries", "moving to a new city", "starting a vegetable garden",
        "preparing for a job interview", "sleeping better", "learning to cook", "buying a used car",
        "training a puppy", "planning a wedding on a budget", "working from home",
        "talking to a teenager", "getting back into exercise", "managing stress at work",
        "organizing a small kitchen", "choosing a laptop", "hosting a dinner party",
        "keeping houseplants alive", "negotiating a salary", "travelling with children",
        "making friends as an adult",
    ],
    "brainstorming": [
        "a birthday party for a ten-year-old", "a community fundraiser", "a rainy weekend",
        "a school science project", "a small coffee shop", "a YouTube channel",
        "team-building at the office", "a board game", "a neighborhood festival",
        "a mobile app for students", "a holiday gift for a coworker", "a reading club",
        "a fantasy world", "a summer camp", "a podcast episode",
    ],
    "coding": [
        "Python lists", "regular expressions", "SQL joins", "git branches", "recursion",
        "JavaScript promises", "unit testing", "sorting algorithms", "hash tables",
        "reading CSV files", "HTTP requests", "Linux shell commands", "CSS layouts",
        "object-oriented programming", "debugging a crash", "Rust ownership", "Docker containers",
        "binary search", "JSON parsing", "writing a command-line tool",
    ],
    "extraction": [
        "a restaurant review", "a meeting transcript", "a news article about a storm",
        "a product listing", "a train timetable", "a customer complaint", "a recipe",
        "a job advertisement", "a weather report", "an invoice",
    ],
    "humanities": [
        "the Roman Empire", "the printing press", "the Silk Road", "ancient Egypt",
        "the Renaissance", "the Industrial Revolution", "jazz music", "Greek mythology",
        "the Cold War", "Shakespeare's plays", "the history of coffee", "world religions",
        "impressionist painting", "the Maya civilization", "the invention of writing",
        "the history of the Olympic Games", "classical music", "the Vikings",
        "the abolition of slavery", "modern architecture",
    ],
    "math": [
        "percentages", "probability with dice", "compound interest", "prime numbers",
        "the area of shapes", "fractions", "averages", "ratios in recipes", "basic algebra",
        "unit conversion", "geometry of triangles", "statistics", "time and distance problems",
        "negative numbers", "exponents",
    ],
    "reasoning": [
        "a logic puzzle", "planning a schedule", "comparing two phone plans",
        "a riddle", "deciding between two job offers", "a family tree puzzle",
        "estimating quantities", "spotting a flaw in an argument", "cause and effect",
        "a seating arrangement puzzle",
    ],
    "roleplay": [
        "a medieval blacksmith", "a detective", "a spaceship captain", "a museum guide",
        "a personal trainer", "a travel agent", "a wise old wizard", "a news reporter",
        "a customer service agent", "a chef on a cooking show",
    ],
    "science": [
        "black holes", "photosynthesis", "volcanoes", "the human immune system", "DNA",
        "climate change", "earthquakes", "electricity", "the solar system", "vaccines",
        "ocean tides", "bees and pollination", "magnets", "the brain", "rainbows",
        "dinosaurs", "antibiotics", "nuclear energy", "the speed of light", "coral reefs",
    ],
    "writing": [
        "a love letter", "a mystery story", "a poem about autumn", "a cover letter",
        "a thank-you note", "a children's bedtime story", "a movie review", "a travel blog post",
        "a persuasive essay", "a toast at a party", "song lyrics", "a fairy tale",
        "a newsletter", "a social media post", "a eulogy",
    ],
}

_LABEL = re.compile(r"^(question|request|task|instruction|prompt|user|q)\s*[:\-]\s*", re.I)
_NUMBER = re.compile(r"^\s*(\d+|[a-zA-Z])[.)]\s*")  # "1. ", "A) "
_CHATTER = re.compile(r"^(i'm|i am|i can|i'd|sure|haha|here|as an|sorry|thank|hello|hi)\b", re.I)
_STOP = {"a", "an", "the", "of", "and", "or", "in", "on", "for", "to", "with", "about", "at", "my",
         "s", "how", "what"}


def clean(text: str, topic: str) -> str | None:
    """The request the target wrote (the first line of its continuation), or None if there is none
    worth keeping: it must read as a request (4-60 words, capitalised, ending in ? . or !), not
    as the assistant chatting, and name its topic (a content word of the topic appears)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    line = _LABEL.sub("", _NUMBER.sub("", lines[0])).strip().strip('"\u201c\u201d\'').strip()
    words = line.split()
    if not 4 <= len(words) <= 60 or line[-1] not in "?.!" or not line[0].isupper():
        return None
    if _CHATTER.match(line) or "assistant" in line.lower() or "AI" in words:
        return None
    content = _stems(topic) - _STOP
    if content and not content & _stems(line):
        return None
    return line


def _stems(text: str) -> set[str]:
    """Lower-case words, a possessive or plural s dropped ("joins", "join's" -> "join")."""
    out = set()
    for w in re.findall(r"[a-z]+(?:'s)?", text.lower()):
        w = w.removesuffix("'s")
        out.add(w[:-1] if w.endswith("s") and len(w) > 3 else w)
    return out


def lead(tok, ask: str, topic: str, rng: random.Random) -> list[int]:
    """The token ids the target continues for one (ask, topic)."""
    if ASKS[ask] is None:
        from spec_compiler.chat import encode_user_prompt

        instruction, begun = QUESTION
        return encode_user_prompt(tok, instruction.format(topic=topic)) + tok.encode(begun.format(topic=topic))
    kind, examples = ASKS[ask]
    a, b = rng.sample(examples, 2)
    return tok.encode(LEAD.format(kind=kind, topic=topic) + f"1. {a}\n2. {b}\n3.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--samples", type=int, default=3, help="answers per (topic, ask) (default 3)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DATA / "prompts_self.jsonl")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from spec_compiler.loading import load_target
    from spec_compiler.train.data import load_tokenizer
    from spec_compiler.train.generate import continue_prompts

    from make_prompts import _norm, dev_clash  # this directory's

    tok = load_tokenizer(args.model_dir)
    target = load_target(args.model_dir)
    jobs = [(cat, topic, ask) for cat, topics in TOPICS.items() for topic in topics for ask in ASKS
            for _ in range(args.samples)]
    read = lambda f: [json.loads(ln)["prompt"] for ln in (DATA / f).read_text().splitlines() if ln]
    dev = read("prompts_dev.jsonl")
    seen = {_norm(t) for t in read("prompts_train.jsonl") + dev}
    gen, rng = torch.Generator().manual_seed(SEED), random.Random(SEED)
    # the end of the line ends the request: newline tokens stop a row like EOS
    stops = sorted({*target.cfg.eos_token_ids, *(t for nl in ("\n", "\n\n") for t in tok.encode(nl)[-1:])})
    out, t0, dropped = [], time.time(), 0
    for b in range(0, len(jobs), args.batch):
        chunk = jobs[b:b + args.batch]
        ids = [lead(tok, ask, topic, rng) for _, topic, ask in chunk]
        seqs = continue_prompts(target, ids, MAX_NEW_TOKENS, stops,
                                TEMPERATURE, gen)
        for (cat, topic, ask), s in zip(chunk, seqs):
            text = clean(tok.decode(s.tokens[s.prompt_len:].tolist(), skip_special_tokens=True), topic)
            if text is None or _norm(text) in seen or dev_clash(text, dev):
                dropped += 1
                continue
            seen.add(_norm(text))
            out.append({"category": cat, "template": f"self-{ask}:{topic}", "topic": topic,
                        "prompt": text})
        print(f"{b + len(chunk)}/{len(jobs)} asks, {len(out)} kept, {dropped} dropped, "
              f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    text = "".join(json.dumps({"id": f"self-{i:04d}", **r}, ensure_ascii=False) + "\n"
                   for i, r in enumerate(out))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {len(out)} prompts to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
