"""The training prompt pool, built from text that ships with the machine and its packages.

Sources (see README.md beside this file): Python stdlib and installed-package functions with
their docstrings (coding and explanation requests), module docstrings (summaries), and
general instructions written here (templates x topics). No benchmark prompts: HumanEval and
the chat benchmark suite are excluded by name and by text (tests check it).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import sys
import warnings

from .chat_pool import chat_pool

CODE_TEMPLATES = (
    "Write a Python function `{name}{sig}` that does the following: {doc}",
    "Implement `{name}{sig}` in Python. {doc} Include a short docstring.",
    "Explain what the Python function `{qual}` does and show a small usage example.",
    "Write a Python function similar to `{qual}`: {doc} Then explain how it works.",
    "Here is the description of `{qual}`: \"{doc}\" Write a few unit tests for it with pytest.",
)
MODULE_TEMPLATES = (
    "Summarize what the Python module `{mod}` is for and name three things you can do with it.",
    "Write a short tutorial that introduces the Python module `{mod}`. It says: \"{doc}\"",
)
GENERAL_TEMPLATES = (
    "Explain {topic} to a beginner in a few paragraphs.",
    "Write a short story that involves {topic}.",
    "List five interesting facts about {topic}.",
    "What are the pros and cons of {topic}?",
    "Write a haiku and then a limerick about {topic}.",
    "Give me a step-by-step plan to learn about {topic}.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "Compare {topic} with something similar and explain the differences.",
    "Write a Python program related to {topic} and explain it.",
    "Answer as a teacher: what is the most common misconception about {topic}?",
)
TOPICS = (
    "photosynthesis", "black holes", "the French revolution", "machine learning", "compound interest",
    "volcanoes", "the immune system", "climate change", "prime numbers", "the stock market", "recursion",
    "sorting algorithms", "the water cycle", "Roman architecture", "electric cars", "sleep", "coffee",
    "chess openings", "the theory of evolution", "renewable energy", "binary search", "hash tables",
    "public speaking", "time management", "gardening", "the human heart", "plate tectonics", "jazz music",
    "the printing press", "cryptography", "database indexes", "the internet", "bees", "the moon landing",
    "probability", "linear algebra", "baking bread", "marathon training", "meditation", "the Renaissance",
    "quantum computing", "rainforests", "ocean currents", "supply and demand", "vaccines", "DNA",
    "the Pythagorean theorem", "regular expressions", "version control with git", "unit testing",
    "operating systems", "compilers", "neural networks", "graph algorithms", "dynamic programming",
    "the solar system", "earthquakes", "ancient Egypt", "the Silk Road", "impressionist painting",
    "classical music", "photography", "recycling", "urban planning", "bicycles", "trains", "airplanes",
    "the Olympic games", "chocolate", "tea ceremonies", "origami", "knitting", "birds migration",
    "dinosaurs", "glaciers", "deserts", "coral reefs", "friendship", "job interviews", "budgeting",
    "negotiation", "writing a resume", "learning a language", "the scientific method", "statistics",
    "fractions", "percentages", "geometry", "calculus", "logic puzzles", "board games", "video games",
    "social media", "privacy online", "password security", "cloud computing", "APIs", "JSON", "SQL",
)
ARITHMETIC = (
    "A shop sells pencils for {a} cents each. How much do {b} pencils cost in dollars? Explain step by step.",
    "Tom has {a} apples and gives {b} to each of his {c} friends. How many apples are left? Show your work.",
    "A train travels {a} km in {c} hours. What is its average speed, and how far does it go in {b} hours?",
    "What is {a} times {b}, minus {c}? Explain the calculation.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
)
TASKS = (
    "reverses the words in a sentence", "counts vowels in a string", "checks if a string is a palindrome",
    "merges two sorted lists", "flattens a nested list", "computes the nth Fibonacci number iteratively",
    "removes duplicates from a list while keeping order", "parses a CSV line into fields",
    "converts Celsius to Fahrenheit for a list of values", "finds the most common word in a text",
    "validates an email address with a regular expression", "groups a list of words by their first letter",
    "computes the transpose of a matrix given as a list of lists", "returns the running average of numbers",
    "formats a number of seconds as hours, minutes and seconds", "implements a simple stack class",
    "implements a queue with two stacks", "reads a text file and returns the number of lines",
    "computes the greatest common divisor of two integers", "rotates a list by k positions",
    "checks whether two strings are anagrams", "builds a word frequency dictionary",
    "finds all pairs in a list that add up to a target", "converts a Roman numeral to an integer",
    "computes the median of a list", "chunks a list into pieces of size n", "implements binary search",
    "implements insertion sort", "serializes a dictionary to a JSON string with sorted keys",
    "computes the dot product of two vectors", "returns the prime factors of an integer",
)


def _first_sentence(doc: str, limit: int = 300) -> str:
    text = " ".join(doc.strip().split())
    cut = text.find(". ")
    text = text if cut < 0 else text[: cut + 1]
    return text[:limit]


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return sig if len(sig) < 120 and " at 0x" not in sig else "(...)"  # no run-dependent addresses


def documented_functions(module_names) -> list[tuple[str, str, str, str]]:
    """(module, name, signature, first docstring sentence) for public documented functions."""
    found = []
    for mod_name in module_names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(mod_name)
        except BaseException:  # some modules refuse to import on this platform  # noqa: BLE001
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            if len(doc) < 30 or " at 0x" in doc or getattr(obj, "__module__", mod_name) not in (mod_name, None):
                continue
            found.append((mod_name, name, _signature(obj), _first_sentence(doc)))
    return found


def module_docs(module_names) -> list[tuple[str, str]]:
    out = []
    for mod_name in module_names:
        mod = sys.modules.get(mod_name)
        doc = inspect.getdoc(mod) if mod is not None else None
        if doc and len(doc) > 40:
            out.append((mod_name, _first_sentence(doc)))
    return out


SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
                "ensurepip", "venv", "__main__", "webbrowser"}
PACKAGE_MODULES = ("numpy", "numpy.linalg", "numpy.random", "numpy.fft", "torch.nn.functional", "torch.linalg",
                   "json", "tqdm", "safetensors.torch")


FIRST_DATA_PROMPTS = 31 * 128  # quanttree/data/train/smollm2-135m-bf16.npz v1: the first 31 shards of 128 prompts


def build_pool(seed: int = 0) -> list[str]:
    """The whole deterministic prompt pool, shuffled."""
    rng = random.Random(seed)
    mods = sorted(m for m in sys.stdlib_module_names if m not in SKIP_MODULES and not m.startswith("_"))
    prompts = []
    for mod, name, sig, doc in documented_functions(mods + list(PACKAGE_MODULES)):
        for template in rng.sample(CODE_TEMPLATES, 3):
            prompts.append(template.format(name=name, sig=sig, doc=doc, qual=f"{mod}.{name}"))
    for mod, doc in module_docs(mods + list(PACKAGE_MODULES)):
        prompts.extend(t.format(mod=mod, doc=doc) for t in MODULE_TEMPLATES)
    prompts.extend(t.format(topic=topic) for t in GENERAL_TEMPLATES for topic in TOPICS)
    for _ in range(600):
        a, b, c = rng.randint(2, 99), rng.randint(2, 40), rng.randint(2, 12)
        prompts.append(rng.choice(ARITHMETIC).format(a=a, b=b, c=c))
    for task in TASKS:
        prompts.append(f"Write a Python function that {task}. Add type hints and a docstring.")
        prompts.append(f"Write a Python function that {task}, then explain its time complexity.")
    prompts = sorted(set(prompts))
    rng.shuffle(prompts)
    # The chat-style section goes right after the prompts the first data set was generated from, so
    # that set's pool indices (and its held-out split) stay valid and new data starts with chat.
    return prompts[:FIRST_DATA_PROMPTS] + chat_pool(seed) + prompts[FIRST_DATA_PROMPTS:]


def with_self_written(pool: list[str], extra: list[str]) -> list[str]:
    """The pool, then extra prompts it does not hold yet (the target's self-written ones,
    self_prompts.py; then each section of code_text.completion_requests): after it, so the
    indices of the prompts before never move."""
    known = set(pool)
    return pool + [p for p in extra if p not in known]


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]
