"""Deterministic feedback traffic: the demo's built-in workload and ``prefstream simulate``.

``generate_traffic(TrafficConfig(end=...))`` simulates users who see candidate answers to a prompt
(``impression`` events) and then behave in one of several ways (careful rater, copier,
position-biased clicker, regenerator, editor, reformulator, abandoner, tie maker). Every answer
has a latent quality in [0, 1], returned as ground truth, so mined pairs can be scored with
:func:`prefers`. Malformed messages, exact re-sends, late events and local reordering are mixed
in at the configured shares. No clock reads: all randomness comes from one seeded
``random.Random`` and all times from ``config.end``.

Two content sources feed the same behaviours:

- synthetic (``config.source`` is None): one to four built-in answers per prompt, written for
  their quality; the user perceives that quality as it is.
- a preference file (``config.source``, see :mod:`prefstream.sim.content`): each request is one row,
  its two answers shown in random slots (chosen = better in truth). The user perceives the truly
  chosen answer as the better one with probability ``prefer_prob`` and acts on that perception.
  Regenerators, editors and reformulators are users unhappy with the first answer: they are shown
  the answer they perceive as worse, and the row's other answer is what the regeneration, the
  edit or the same-intent reformulation brings. A share of the rows (``holdout``, grouped by
  prompt) is never simulated and is returned as explicit labels. Reading that file is the only
  I/O.

Its size (~680 lines) is one user model: the behaviours above share its random state, and a
split would hand that state between files.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple, Protocol

from prefstream.errors import ConfigError
from prefstream.schemas.events import (
    MAX_TEXT_CHARS,
    Click,
    Copy,
    Edit,
    FeedbackEvent,
    Impression,
    Reformulate,
    Regenerate,
    SessionEnd,
    ThumbsDown,
    ThumbsUp,
)
from prefstream.sim.content import SourcePair, read_source, rephrase, split_holdout

MODEL_VERSIONS = ("chat-v1.0", "chat-v1.1", "chat-v2.0-rc")
LATE_BY = timedelta(hours=6)
SESSION_END_P = 0.8
SHUFFLE_P = 0.1
BAD_KINDS = (
    "not_json", "json_array", "missing_event_id", "unknown_type", "wrong_field_type",
    "unknown_field", "text_too_long", "naive_ts", "future_ts", "invalid_utf8", "empty_value",
)

# (task, concrete correct answer, confidently wrong answer)
TOPICS: tuple[tuple[str, str, str], ...] = (
    ("reverse a list in Python", "Use `xs[::-1]` for a copy; `xs.reverse()` works in place.",
     "Call `sorted(xs)`, sorting always reverses a list."),
    ("read a file line by line in Python", "Use `with open(p) as f:` then `for line in f:`.",
     "Call `f.read(1)` in a loop; files cannot be iterated."),
    ("merge two dicts in Python", "Use `a | b` (3.9+) or `{**a, **b}`; keys of `b` win.",
     "Dicts cannot be merged; convert both to lists and add them."),
    ("remove duplicates from a list keeping order", "Use `list(dict.fromkeys(xs))`.",
     "Use `set(xs)`, which always keeps the original order."),
    ("undo the last git commit but keep changes", "Run `git reset --soft HEAD~1`.",
     "Run `git reset --hard HEAD~1`, which keeps your changes safe."),
    ("create a branch in git", "Run `git switch -c topic`; older git: `git checkout -b topic`.",
     "Run `git branch --delete topic` to create it."),
    ("find large files on Linux", "Run `du -ah . | sort -rh | head -20`.",
     "Run `ls -z`, which sorts files by size."),
    ("see which process uses a port", "Run `ss -ltnp | grep :8080` or `lsof -i :8080`.",
     "Run `ping 8080` to see the owning process."),
    ("convert a string to an integer in JavaScript", "Use `Number.parseInt(s, 10)`; check `isNaN`.",
     "Call `s.toInteger()`, every string has it."),
    ("deep copy an object in JavaScript", "Use `structuredClone(obj)`; it copies nested values.",
     "Write `const copy = obj;`, which copies every nested field."),
    ("join two tables in SQL", "Use `FROM a JOIN b ON a.id = b.a_id`; LEFT JOIN keeps all of a.",
     "Use `FROM a, b` with no condition; SQL matches rows itself."),
    ("count rows per group in SQL", "Use `SELECT k, COUNT(*) FROM t GROUP BY k`.",
     "Use `SELECT COUNT(k) FROM t ORDER BY k`, which groups by k."),
    ("make an HTTP request in Python", "Use `requests.get(url, timeout=10)` and check the status.",
     "Use `urllib.fetch(url)`, the built-in async client."),
    ("parse JSON in Python", "Use `json.loads(text)` for strings and `json.load(f)` for files.",
     "Use `eval(text)`; it is the safe way to parse JSON."),
    ("sort a list of dicts by a key in Python", "Use `sorted(rows, key=lambda r: r['age'])`.",
     "Dicts are unordered, so a list of dicts cannot be sorted."),
    ("time a piece of Python code", "Use `time.perf_counter()` around it, or `python -m timeit`.",
     "Call `time.sleep()`, which returns the elapsed time."),
    ("create a virtual environment in Python", "Run `python -m venv .venv`, then activate it.",
     "Run `pip install venv --global`; environments are shared."),
    ("handle exceptions in Python", "Use `try:` and catch only `except KeyError:`.",
     "Put `except: pass` everywhere; hiding errors makes code robust."),
    ("center a div in CSS", "Give the parent `display: grid; place-items: center`.",
     "Use `<center>` tags; CSS cannot center block elements."),
    ("write a for loop in Bash", "Use `for f in *.txt; do echo \"$f\"; done`.",
     "Bash has no loops; run the script once per file."),
    ("rename many files on Linux", "Use `for f in *.jpeg; do mv \"$f\" \"${f%.*}.jpg\"; done`.",
     "Run `cp -r` on the folder, which renames its files."),
    ("set an environment variable on Linux", "Run `export NAME=value`; put it in `~/.bashrc`.",
     "Edit `/etc/hosts` and add a `NAME=value` line."),
    ("compute the mean of a column in pandas", "Use `df['price'].mean()`; it skips NaN by default.",
     "Use `df.sum() / 0` to get the mean."),
    ("read a CSV file with pandas", "Use `pd.read_csv('data.csv')`; pass `sep=';'` if needed.",
     "Use `pd.open('data.csv').rows()`."),
    ("free disk space used by Docker", "Run `docker system prune`, plus `--volumes`.",
     "Delete `/var/lib/docker` by hand while the daemon runs."),
    ("write a unit test in Python", "Write `def test_add(): assert add(1, 2) == 3`, run `pytest`.",
     "Tests are not needed if the code ran once without errors."),
    ("format a date in Python", "Use `d.strftime('%Y-%m-%d')`, or `d.isoformat()` for ISO 8601.",
     "Use `str(d)[::-1]`, the standard date format."),
    ("match an email with a regex", "Use `^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$`, then send a check mail.",
     "Use `.*`, which matches only valid emails."),
    ("make a function async in JavaScript", "Declare `async function load()` and `await` promises.",
     "Wrap the body in `setTimeout`; that makes it async."),
    ("compare two files on Linux", "Run `diff -u a.txt b.txt`; use `cmp` for binary files.",
     "Run `cat a.txt b.txt` and compare by eye; there is no tool."),
)
PHRASINGS = (
    "How do I {}?", "How can I {}?", "What is the best way to {}?", "Can you show me how to {}?",
    "Quick question: how do I {}?", "Explain how to {}.",
)
FILLERS = (
    "Good question.", "Here is the short version.", "This comes up a lot.", "Hope this helps!",
    "Let me explain step by step.", "Many people run into this.", "There are a few approaches.",
    "Let me know if you need more detail.", "It is worth testing on a small example first.",
    "The documentation covers the edge cases.", "Happy coding!", "That is a common task.",
    "I will keep this brief.", "Please double-check against your version.",
)
HEDGES = ("I think that is it, roughly.", "Not sure about the details.", "Something like that.")
VAGUE = (
    "It depends on your setup and what you want to achieve.",
    "There are many ways to do this; search online for tutorials.",
    "Consider consulting the official documentation or a colleague.",
)


@dataclass(frozen=True, kw_only=True)
class TrafficConfig:
    """What to generate; ``end`` (tz-aware) is the latest event time.

    ``source``: a preference JSONL file as content (None = the built-in synthetic texts);
    ``prefer_prob``: how often a user perceives the truly chosen answer of a row as the better;
    ``holdout``: share of the file's prompts never simulated (returned as ``Traffic.holdout``).
    """

    n_events: int = 5000
    seed: int = 0
    end: datetime
    hours: int = 12
    n_users: int = 200
    bad_share: float = 0.02
    duplicate_share: float = 0.01
    late_share: float = 0.005
    shuffle_window: int = 5
    source: Path | None = None
    prefer_prob: float = 0.8
    holdout: float = 0.2

    def __post_init__(self) -> None:
        if self.end.tzinfo is None or self.end.utcoffset() is None:
            raise ValueError("end must be timezone-aware")
        if self.n_events < 1 or self.n_users < 1 or self.hours < 2 or self.shuffle_window < 0:
            raise ValueError("need n_events >= 1, n_users >= 1, hours >= 2, shuffle_window >= 0")
        for share in (self.bad_share, self.duplicate_share, self.late_share):
            if not 0.0 <= share < 0.5:
                raise ValueError("shares must be in [0, 0.5)")
        if not 0.0 <= self.prefer_prob <= 1.0 or not 0.0 <= self.holdout < 1.0:
            raise ValueError("need prefer_prob in [0, 1] and holdout in [0, 1)")


@dataclass
class Traffic:
    """Generated messages plus the ground truth needed to check what a consumer makes of them."""

    messages: list[tuple[bytes, bytes]]
    quality: dict[str, float]
    counts: dict[str, int]
    bad_reasons: dict[str, int]
    labels: list[str] = field(default_factory=list)  # per message: valid|duplicate|late|bad:<kind>
    skipped: dict[str, int] = field(default_factory=dict)  # source rows skipped, by reason
    holdout: list[SourcePair] = field(default_factory=list)  # source rows never simulated


def prefers(
    quality: dict[str, float], chosen_response_id: str, rejected_response_id: str
) -> bool | None:
    """Ground truth: is ``chosen`` better than ``rejected``? None if either is unknown or equal."""
    a, b = quality.get(chosen_response_id), quality.get(rejected_response_id)
    if a is None or b is None or a == b:
        return None
    return a > b


@dataclass
class _Shown:
    response_id: str
    quality: float  # as the user perceives it (the truth for synthetic answers)
    position: int


class _Answer(NamedTuple):
    """A source answer not shown yet: its text, true quality and the quality the user sees."""

    text: str
    truth: float
    perceived: float


@dataclass
class _Request:
    request_id: str
    topic: int  # synthetic content only (-1 for a source row)
    prompt: str
    shown: list[_Shown] = field(default_factory=list)
    spare: list[_Answer] = field(default_factory=list)  # a source row's answer not shown yet


_Maker = Callable[..., FeedbackEvent]  # an event class
_Entry = tuple[datetime, bytes, bytes, str]  # (send time, key, value, label)


class _Gen:
    """Id counters, answer texts and the ground-truth tables shared by all sessions."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.tag = f"{self.rng.getrandbits(32):08x}"
        self.ids: Counter[str] = Counter()
        self.quality: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.used_texts: set[str] = set()
        self.content: _Content = _Synthetic(self)

    def next_id(self, prefix: str) -> str:
        self.ids[prefix] += 1
        return f"{prefix}{self.tag}-{self.ids[prefix]:06d}"

    def prompt(self, topic: int, avoid: str = "") -> str:
        options = [p.format(TOPICS[topic][0]) for p in PHRASINGS]
        return self.rng.choice([p for p in options if p != avoid])

    def unique(self, text: str) -> str:
        while text in self.used_texts:
            text = f"{text} {self.rng.choice(FILLERS)}"
        self.used_texts.add(text)
        return text

    def answer_text(self, topic: int, q: float) -> str:
        rng = self.rng
        _, good, wrong = TOPICS[topic]
        if q >= 0.7:
            core = good
        elif q >= 0.45:
            core = f"{_first_clause(good)}. {rng.choice(HEDGES)}"
        elif q >= 0.2:
            core = wrong
        elif rng.random() < 0.5:
            core = rng.choice(VAGUE)
        else:
            core = TOPICS[(topic + rng.randrange(1, len(TOPICS))) % len(TOPICS)][1]
        # Length is noise, not quality: weak answers tend to be padded more.
        fill = rng.sample(FILLERS, rng.randint(1, 4) if q < 0.5 else rng.randint(0, 3))
        cut = rng.randint(0, len(fill))
        return self.unique(" ".join([*fill[:cut], core, *fill[cut:]]))

    def edited_text(self, topic: int) -> str:
        return self.unique(f"{TOPICS[topic][1]} (Edited: tested and verified.)")


def _first_clause(text: str) -> str:
    """``text`` up to its first "; " outside backticks (an incomplete answer)."""
    parts = text.split("; ")
    for i in range(1, len(parts)):
        head = "; ".join(parts[:i])
        if head.count("`") % 2 == 0:
            return head
    return text.rstrip(".")


class _Session:
    """Builds one session's events on a relative clock (seconds since the first event)."""

    def __init__(self, gen: _Gen, session_id: str, user_id: str) -> None:
        self.gen, self.rng = gen, gen.rng
        self.session_id, self.user_id = session_id, user_id
        self.t = 0.0
        self.pending: list[tuple[float, _Maker, dict[str, object]]] = []

    def emit(self, cls: _Maker, request_id: str, gap: float, **fields: object) -> None:
        self.t += gap
        self.pending.append((self.t, cls, {"request_id": request_id, **fields}))

    def signal(self, cls: _Maker, req: _Request, shown: _Shown, **fields: object) -> None:
        self.emit(cls, req.request_id, self.rng.uniform(3, 90), response_id=shown.response_id,
                  **fields)

    def show(self, req: _Request, position: int, q: float, gap: float,
             answer: _Answer | None = None) -> _Shown:
        """Show a synthetic answer of perceived = true quality ``q``, or a source ``answer``."""
        rid = self.gen.next_id("r")
        self.gen.quality[rid] = q if answer is None else answer.truth
        text = self.gen.answer_text(req.topic, q) if answer is None else answer.text
        self.emit(Impression, req.request_id, gap, response_id=rid, prompt=req.prompt,
                  response_text=text, position=position,
                  model_version=self.rng.choice(MODEL_VERSIONS))
        shown = _Shown(rid, q, position)
        req.shown.append(shown)
        return shown

    def request(self, topic: int, prompt: str, gap: float, request_id: str = "") -> _Request:
        req = _Request(request_id or self.gen.next_id("q"), topic, prompt)
        for pos in range(self.rng.randint(1, 4)):
            self.show(req, pos, self.rng.random(), gap if pos == 0 else self.rng.uniform(0.05, 1.5))
        return req

    def build(self, start: datetime) -> list[FeedbackEvent]:
        common = {"session_id": self.session_id, "user_id": self.user_id}
        return [
            cls(event_id=self.gen.next_id("e"), ts=start + timedelta(milliseconds=round(t * 1000)),
                **common, **fields)
            for t, cls, fields in self.pending
        ]

    def reformulate(self, req: _Request, prompt: str) -> str:
        """Emit a reformulation of ``req`` as ``prompt``; returns the new request id."""
        new_id = self.gen.next_id("q")
        self.emit(Reformulate, new_id, self.rng.uniform(5, 60), prompt=prompt,
                  previous_request_id=req.request_id)
        return new_id


class _Content(Protocol):
    """Where prompts and answers come from; the behaviours below are the same for every source."""

    flip_p: float  # share of careful raters who get it backwards

    def open(self, s: _Session, first: bool, persona: str) -> _Request: ...
    def regenerate(self, s: _Session, req: _Request, poor: _Shown) -> _Shown | None: ...
    def edit(self, s: _Session, req: _Request, target: _Shown) -> str | None: ...
    def reformulate(self, s: _Session, req: _Request, same: bool) -> _Request: ...


class _Synthetic:
    """Built-in texts written for a random latent quality, perceived as it is."""

    flip_p = 0.1

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen

    def open(self, s: _Session, first: bool, persona: str) -> _Request:
        topic = s.rng.randrange(len(TOPICS))
        prompt = self.gen.prompt(topic)
        return s.request(topic, prompt, 0.0 if first else s.rng.uniform(10, 300))

    def regenerate(self, s: _Session, req: _Request, poor: _Shown) -> _Shown:
        q_new = poor.quality + (1 - poor.quality) * s.rng.uniform(0.3, 1.0)
        return s.show(req, poor.position, q_new, s.rng.uniform(1, 8))

    def edit(self, s: _Session, req: _Request, target: _Shown) -> str:
        self.gen.quality[f"{target.response_id}:edit"] = (
            target.quality + (1 - target.quality) * s.rng.uniform(0.3, 1.0))
        return self.gen.edited_text(req.topic)

    def reformulate(self, s: _Session, req: _Request, same: bool) -> _Request:
        topic = req.topic if same else (req.topic + s.rng.randrange(1, len(TOPICS))) % len(TOPICS)
        prompt = self.gen.prompt(topic, avoid=req.prompt)
        new_id = s.reformulate(req, prompt)
        return s.request(topic, prompt, s.rng.uniform(1, 5), request_id=new_id)


class _External:
    """Rows of a preference file, cycled in a fresh random order on every pass."""

    flip_p = 0.0  # ``prefer_prob`` is this source's rater noise
    SINGLE = frozenset({"regenerator", "editor", "reformulator"})

    def __init__(self, gen: _Gen, pairs: list[SourcePair]) -> None:
        self.gen, self.pairs = gen, pairs
        self.queue: list[SourcePair] = []

    def next_row(self) -> SourcePair:
        if not self.queue:
            self.queue = list(self.pairs)
            self.gen.rng.shuffle(self.queue)
            self.gen.counts["source_passes"] += 1
        return self.queue.pop()

    def answers(self, row: SourcePair) -> tuple[_Answer, _Answer]:
        """(perceived better, perceived worse); the truly chosen one is better with prefer_prob."""
        rng = self.gen.rng
        hi, lo = rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.5)
        right = rng.random() < self.gen.config.prefer_prob
        self.gen.counts["user_prefers_chosen" if right else "user_prefers_rejected"] += 1
        chosen = _Answer(row.chosen, hi, hi if right else lo)
        rejected = _Answer(row.rejected, lo, lo if right else hi)
        return (chosen, rejected) if right else (rejected, chosen)

    def show_row(self, s: _Session, req: _Request, row: SourcePair, gap: float,
                 single: bool) -> _Request:
        better, worse = self.answers(row)
        if single:  # an unhappy user: shown the answer they dislike, the other one kept back
            s.show(req, 0, worse.perceived, gap, worse)
            req.spare.append(better)
            return req
        order = [better, worse]
        s.rng.shuffle(order)
        for pos, answer in enumerate(order):
            s.show(req, pos, answer.perceived, gap if pos == 0 else s.rng.uniform(0.05, 1.5),
                   answer)
        return req

    def open(self, s: _Session, first: bool, persona: str) -> _Request:
        row = self.next_row()
        req = _Request(self.gen.next_id("q"), -1, row.prompt)
        gap = 0.0 if first else s.rng.uniform(10, 300)
        return self.show_row(s, req, row, gap, persona in self.SINGLE)

    def regenerate(self, s: _Session, req: _Request, poor: _Shown) -> _Shown | None:
        if not req.spare:
            return None
        fresh = req.spare.pop()
        return s.show(req, poor.position, fresh.perceived, s.rng.uniform(1, 8), fresh)

    def edit(self, s: _Session, req: _Request, target: _Shown) -> str | None:
        """The user rewrites the answer into the row's other one (its truth goes with it)."""
        if not req.spare:
            return None
        self.gen.quality[f"{target.response_id}:edit"] = req.spare[0].truth
        return req.spare[0].text

    def reformulate(self, s: _Session, req: _Request, same: bool) -> _Request:
        if same and req.spare:
            prompt, spare = rephrase(req.prompt, s.rng), req.spare.pop()
            new = _Request(s.reformulate(req, prompt), -1, prompt)
            s.show(new, 0, spare.perceived, s.rng.uniform(1, 5), spare)
            return new
        row = self.next_row()
        new = _Request(s.reformulate(req, row.prompt), -1, row.prompt)
        return self.show_row(s, new, row, s.rng.uniform(1, 5), single=False)


def _best(req: _Request) -> _Shown:
    return max(req.shown, key=lambda s: s.quality)


def _worst(req: _Request) -> _Shown:
    return min(req.shown, key=lambda s: s.quality)


def _careful(s: _Session, req: _Request) -> None:
    flip = s.rng.random() < s.gen.content.flip_p  # noise: the rater gets it backwards
    s.gen.counts["careful_flipped"] += flip
    if len(req.shown) == 1:
        up = (req.shown[0].quality >= 0.5) != flip
        s.signal(ThumbsUp if up else ThumbsDown, req, req.shown[0])
        return
    best, worst = (_worst(req), _best(req)) if flip else (_best(req), _worst(req))
    s.signal(ThumbsUp, req, best)
    s.signal(ThumbsDown, req, worst)


def _copier(s: _Session, req: _Request) -> None:
    best = _best(req)
    if s.rng.random() < best.quality:
        s.signal(Copy, req, best)
    else:
        s.gen.counts["copier_no_copy"] += 1


def _clicker(s: _Session, req: _Request) -> None:
    for shown in req.shown:
        if s.rng.random() < 1 / (shown.position + 1) and s.rng.random() < shown.quality:
            good = shown.quality >= 0.5
            dwell = s.rng.randint(8_000, 60_000) if good else s.rng.randint(200, 2_900)
            s.signal(Click, req, shown, dwell_ms=dwell)


def _regenerator(s: _Session, req: _Request) -> None:
    poor = _worst(req)
    s.signal(Regenerate, req, poor)
    fresh = s.gen.content.regenerate(s, req, poor)
    if fresh is None:  # nothing else to show: the user gives up
        s.gen.counts["regenerate_abandoned"] += 1
        return
    roll = s.rng.random()
    if roll < 0.45:
        s.signal(Copy, req, fresh)
    elif roll < 0.8:
        s.signal(ThumbsUp, req, fresh)
    else:
        s.gen.counts["regenerate_abandoned"] += 1


def _editor(s: _Session, req: _Request) -> None:
    target = min(req.shown, key=lambda x: abs(x.quality - 0.5))
    text = s.gen.content.edit(s, req, target)
    if text is not None:
        s.signal(Edit, req, target, edited_text=text)


def _reformulator(s: _Session, req: _Request) -> None:
    same = s.rng.random() < 0.6
    s.gen.counts["reformulate_same_intent" if same else "reformulate_new_intent"] += 1
    new = s.gen.content.reformulate(s, req, same)
    s.signal(Copy if s.rng.random() < 0.5 else ThumbsUp, new, _best(new))


def _tie(s: _Session, req: _Request) -> None:
    cls = ThumbsUp if s.rng.random() < 0.5 else ThumbsDown
    for shown in s.rng.sample(req.shown, min(2, len(req.shown))):
        s.signal(cls, req, shown)


BEHAVIOURS: dict[str, tuple[float, Callable[[_Session, _Request], None]]] = {
    "careful": (0.16, _careful), "copier": (0.14, _copier), "clicker": (0.20, _clicker),
    "regenerator": (0.10, _regenerator), "editor": (0.08, _editor), "tie": (0.10, _tie),
    "reformulator": (0.10, _reformulator), "abandoner": (0.12, lambda s, req: None),
}


def _session(gen: _Gen) -> tuple[_Session, list[FeedbackEvent]]:
    rng, cfg = gen.rng, gen.config
    s = _Session(gen, gen.next_id("s"), f"u{rng.randrange(cfg.n_users):04d}")
    name = rng.choices(list(BEHAVIOURS), weights=[w for w, _ in BEHAVIOURS.values()])[0]
    gen.counts[f"behaviour:{name}"] += 1
    for i in range(rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]):
        BEHAVIOURS[name][1](s, gen.content.open(s, i == 0, name))
    if rng.random() < SESSION_END_P:
        s.emit(SessionEnd, str(s.pending[-1][2]["request_id"]), rng.uniform(5, 120))
        gen.counts["session_end"] += 1
    window = cfg.hours * 3600 - s.t
    start = cfg.end - timedelta(milliseconds=round(1000 * (s.t + rng.uniform(0, window))))
    return s, s.build(start)


def _reorder(rng: random.Random, events: list[FeedbackEvent], window: int) -> int:
    """Locally shuffle (each event moves at most ``window`` places); a session_end stays last."""
    n = len(events) - (1 if events and isinstance(events[-1], SessionEnd) else 0)
    keys = [i + (rng.uniform(0, window) if rng.random() < SHUFFLE_P else 0) for i in range(n)]
    order = sorted(range(n), key=lambda i: keys[i])
    events[:n] = [events[i] for i in order]
    return sum(1 for i, j in enumerate(order) if i != j)


def _late(gen: _Gen, s: _Session, events: list[FeedbackEvent]) -> FeedbackEvent:
    """A fresh signal on an answer shown in the session, timed hours before the session started."""
    rng = gen.rng
    shown = rng.choice([e for e in events if isinstance(e, Impression)])
    ts = min(e.ts for e in events) - LATE_BY - timedelta(seconds=rng.randint(0, 1800))
    cls = rng.choice((ThumbsUp, ThumbsDown, Click))
    extra = {"dwell_ms": rng.randint(8_000, 60_000)} if cls is Click else {}
    return cls(event_id=gen.next_id("e"), session_id=s.session_id, user_id=s.user_id,
               request_id=shown.request_id, response_id=shown.response_id, ts=ts, **extra)


def _bad_value(gen: _Gen, kind: str, template: Impression) -> bytes:
    """One malformed message of the given kind, derived from a valid impression."""
    d = json.loads(template.model_dump_json())
    d["event_id"] = gen.next_id("e")
    if kind == "not_json":
        return f"impression session={template.session_id} pos=0".encode()
    if kind == "empty_value":
        return b""
    if kind == "missing_event_id":
        del d["event_id"]
    elif kind == "unknown_type":
        d["type"] = "like"
    elif kind == "wrong_field_type":
        d["position"] = "first"
    elif kind == "unknown_field":
        d["sentiment"] = "positive"
    elif kind == "text_too_long":
        d["response_text"] = "x" * (MAX_TEXT_CHARS + 1)
    elif kind == "naive_ts":
        d["ts"] = template.ts.replace(tzinfo=None).isoformat()
    elif kind == "future_ts":
        d["ts"] = (gen.config.end + timedelta(days=30)).isoformat()
    raw = json.dumps([d] if kind == "json_array" else d, separators=(",", ":")).encode()
    if kind == "invalid_utf8":
        raw = raw.replace(b'"response_text":"', b'"response_text":"\xff\xfe', 1)
    return raw


def _send_list(gen: _Gen, s: _Session, events: list[FeedbackEvent], n_late: int,
               n_dup: int) -> list[_Entry]:
    """Reorder locally, add late events and exact re-sends (all before any session_end), then
    stamp send times: an event leaves once everything before it in send order has happened."""
    gen.counts["reordered"] += _reorder(gen.rng, events, gen.config.shuffle_window)
    labels = ["valid"] * len(events)
    tail = len(events) - (1 if isinstance(events[-1], SessionEnd) else 0)
    for _ in range(n_late):
        events.insert(tail, _late(gen, s, events))
        labels.insert(tail, "late")
        tail += 1
    valid = [i for i in range(tail) if labels[i] == "valid"]
    for i in sorted(gen.rng.sample(valid, min(n_dup, len(valid))), reverse=True):
        at = min(tail, i + 1 + gen.rng.randint(0, 2))  # descending i: earlier indices stay put
        events.insert(at, events[i])
        labels.insert(at, "duplicate")
        tail += 1
    out: list[_Entry] = []
    clock = events[0].ts
    for event, label in zip(events, labels, strict=True):
        clock = clock if label == "late" else max(clock, event.ts)
        out.append((clock, s.session_id.encode(), event.model_dump_json().encode(), label))
    return out


def _use_source(gen: _Gen) -> tuple[dict[str, int], list[SourcePair]]:
    """Switch ``gen`` to the configured source file: (skipped rows by reason, held-out rows)."""
    config = gen.config
    if config.source is None:
        return {}, []
    try:
        rows = read_source(config.source)
    except OSError as exc:
        raise ConfigError(f"cannot read source {config.source}: {exc}") from exc
    simulated, held = split_holdout(rows.pairs, config.holdout, config.seed)
    if not simulated:
        raise ConfigError(f"{config.source}: no preference rows left to simulate "
                          f"({rows.n_rows} rows, skipped {dict(rows.skipped)}, "
                          f"{len(held)} held out)")
    gen.content = _External(gen, simulated)
    gen.counts.update(source_rows=rows.n_rows, source_valid=len(rows.pairs),
                      source_skipped=rows.n_rows - len(rows.pairs), source_holdout=len(held),
                      source_simulated=len(simulated))
    return dict(rows.skipped), held


def generate_traffic(config: TrafficConfig) -> Traffic:
    """Generate the workload described by ``config`` (deterministic for a given config and
    source file). Raises ``ConfigError`` when the source cannot be read or has no usable row."""
    gen = _Gen(config)
    rng = gen.rng
    skipped, holdout = _use_source(gen)
    n_bad, n_late, n_dup = (round(share * config.n_events) for share in
                            (config.bad_share, config.late_share, config.duplicate_share))
    sessions: list[tuple[_Session, list[FeedbackEvent]]] = []
    n_valid = 0
    while n_valid + n_late + n_bad < config.n_events or not sessions:
        sessions.append(_session(gen))
        n_valid += len(sessions[-1][1])
    lates = Counter(rng.randrange(len(sessions)) for _ in range(n_late))
    dups = Counter(rng.randrange(len(sessions)) for _ in range(n_dup))
    entries: list[_Entry] = []
    for i, (s, events) in enumerate(sessions):
        gen.counts.update(f"type:{e.type}" for e in events)
        entries += _send_list(gen, s, events, lates[i], dups[i])
    impressions = [e for _, events in sessions for e in events if isinstance(e, Impression)]
    kinds = [BAD_KINDS[i % len(BAD_KINDS)] for i in range(n_bad)]
    rng.shuffle(kinds)
    start = config.end - timedelta(hours=config.hours)
    for kind in kinds:
        template = rng.choice(impressions)
        at = start + timedelta(seconds=rng.uniform(0, config.hours * 3600))
        entries.append((at, template.session_id.encode(), _bad_value(gen, kind, template),
                        f"bad:{kind}"))
    entries = [entries[i] for i in sorted(range(len(entries)), key=lambda i: (entries[i][0], i))]
    tally = Counter(label for *_, label in entries)
    counts = dict(gen.counts)
    counts.update(
        valid=tally["valid"] + tally["late"], late=tally["late"], duplicates=tally["duplicate"],
        bad=n_bad, sessions=len(sessions), requests=gen.ids["q"], responses=gen.ids["r"],
        no_session_end=len(sessions) - gen.counts["session_end"],
    )
    return Traffic(
        messages=[(key, value) for _, key, value, _ in entries], quality=dict(gen.quality),
        counts=counts, bad_reasons=dict(Counter(kinds)), labels=[e[3] for e in entries],
        skipped=skipped, holdout=holdout,
    )
