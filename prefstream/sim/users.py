"""The simulated users and what they are shown: the generator's shared state (``Gen``: one seeded
``random.Random``, id counters, ground-truth qualities), one session's events on a relative clock
(``Session``), and the two content sources (``Synthetic`` built-in texts, ``External`` rows of a
preference file). How each kind of user then behaves is in ``prefstream.sim.behaviours``."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol

from prefstream.schemas.events import FeedbackEvent, Impression, Reformulate
from prefstream.sim.content import SourcePair, rephrase
from prefstream.sim.texts import FILLERS, HEDGES, PHRASINGS, TOPICS, VAGUE, first_clause
from prefstream.sim.workload import TrafficConfig

MODEL_VERSIONS = ("chat-v1.0", "chat-v1.1", "chat-v2.0-rc")


@dataclass
class Shown:
    response_id: str
    quality: float  # as the user perceives it (the truth for synthetic answers)
    position: int


class Answer(NamedTuple):
    """A source answer not shown yet: its text, true quality and the quality the user sees."""

    text: str
    truth: float
    perceived: float


@dataclass
class Request:
    request_id: str
    topic: int  # synthetic content only (-1 for a source row)
    prompt: str
    shown: list[Shown] = field(default_factory=list)
    spare: list[Answer] = field(default_factory=list)  # a source row's answer not shown yet


Maker = Callable[..., FeedbackEvent]  # an event class


class Gen:
    """Id counters, answer texts and the ground-truth tables shared by all sessions."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.tag = f"{self.rng.getrandbits(32):08x}"
        self.ids: Counter[str] = Counter()
        self.quality: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.used_texts: set[str] = set()
        self.content: Content = Synthetic(self)

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
            core = f"{first_clause(good)}. {rng.choice(HEDGES)}"
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



class Session:
    """Builds one session's events on a relative clock (seconds since the first event)."""

    def __init__(self, gen: Gen, session_id: str, user_id: str) -> None:
        self.gen, self.rng = gen, gen.rng
        self.session_id, self.user_id = session_id, user_id
        self.t = 0.0
        self.pending: list[tuple[float, Maker, dict[str, object]]] = []

    def emit(self, cls: Maker, request_id: str, gap: float, **fields: object) -> None:
        self.t += gap
        self.pending.append((self.t, cls, {"request_id": request_id, **fields}))

    def signal(self, cls: Maker, req: Request, shown: Shown, **fields: object) -> None:
        self.emit(cls, req.request_id, self.rng.uniform(3, 90), response_id=shown.response_id,
                  **fields)

    def show(self, req: Request, position: int, q: float, gap: float,
             answer: Answer | None = None) -> Shown:
        """Show a synthetic answer of perceived = true quality ``q``, or a source ``answer``."""
        rid = self.gen.next_id("r")
        self.gen.quality[rid] = q if answer is None else answer.truth
        text = self.gen.answer_text(req.topic, q) if answer is None else answer.text
        self.emit(Impression, req.request_id, gap, response_id=rid, prompt=req.prompt,
                  response_text=text, position=position,
                  model_version=self.rng.choice(MODEL_VERSIONS))
        shown = Shown(rid, q, position)
        req.shown.append(shown)
        return shown

    def request(self, topic: int, prompt: str, gap: float, request_id: str = "") -> Request:
        req = Request(request_id or self.gen.next_id("q"), topic, prompt)
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

    def reformulate(self, req: Request, prompt: str) -> str:
        """Emit a reformulation of ``req`` as ``prompt``; returns the new request id."""
        new_id = self.gen.next_id("q")
        self.emit(Reformulate, new_id, self.rng.uniform(5, 60), prompt=prompt,
                  previous_request_id=req.request_id)
        return new_id


class Content(Protocol):
    """Where prompts and answers come from; the behaviours (``prefstream.sim.behaviours``) are
    the same for every source."""

    flip_p: float  # share of careful raters who get it backwards

    def open(self, s: Session, first: bool, persona: str) -> Request: ...
    def regenerate(self, s: Session, req: Request, poor: Shown) -> Shown | None: ...
    def edit(self, s: Session, req: Request, target: Shown) -> str | None: ...
    def reformulate(self, s: Session, req: Request, same: bool) -> Request: ...


class Synthetic:
    """Built-in texts written for a random latent quality, perceived as it is."""

    flip_p = 0.1

    def __init__(self, gen: Gen) -> None:
        self.gen = gen

    def open(self, s: Session, first: bool, persona: str) -> Request:
        topic = s.rng.randrange(len(TOPICS))
        prompt = self.gen.prompt(topic)
        return s.request(topic, prompt, 0.0 if first else s.rng.uniform(10, 300))

    def regenerate(self, s: Session, req: Request, poor: Shown) -> Shown:
        q_new = poor.quality + (1 - poor.quality) * s.rng.uniform(0.3, 1.0)
        return s.show(req, poor.position, q_new, s.rng.uniform(1, 8))

    def edit(self, s: Session, req: Request, target: Shown) -> str:
        self.gen.quality[f"{target.response_id}:edit"] = (
            target.quality + (1 - target.quality) * s.rng.uniform(0.3, 1.0))
        return self.gen.edited_text(req.topic)

    def reformulate(self, s: Session, req: Request, same: bool) -> Request:
        topic = req.topic if same else (req.topic + s.rng.randrange(1, len(TOPICS))) % len(TOPICS)
        prompt = self.gen.prompt(topic, avoid=req.prompt)
        new_id = s.reformulate(req, prompt)
        return s.request(topic, prompt, s.rng.uniform(1, 5), request_id=new_id)


class External:
    """Rows of a preference file, cycled in a fresh random order on every pass."""

    flip_p = 0.0  # ``prefer_prob`` is this source's rater noise
    SINGLE = frozenset({"regenerator", "editor", "reformulator"})

    def __init__(self, gen: Gen, pairs: list[SourcePair]) -> None:
        self.gen, self.pairs = gen, pairs
        self.queue: list[SourcePair] = []

    def next_row(self) -> SourcePair:
        if not self.queue:
            self.queue = list(self.pairs)
            self.gen.rng.shuffle(self.queue)
            self.gen.counts["source_passes"] += 1
        return self.queue.pop()

    def answers(self, row: SourcePair) -> tuple[Answer, Answer]:
        """(perceived better, perceived worse); the truly chosen one is better with prefer_prob."""
        rng = self.gen.rng
        hi, lo = rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.5)
        right = rng.random() < self.gen.config.prefer_prob
        self.gen.counts["user_prefers_chosen" if right else "user_prefers_rejected"] += 1
        chosen = Answer(row.chosen, hi, hi if right else lo)
        rejected = Answer(row.rejected, lo, lo if right else hi)
        return (chosen, rejected) if right else (rejected, chosen)

    def show_row(self, s: Session, req: Request, row: SourcePair, gap: float,
                 single: bool) -> Request:
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

    def open(self, s: Session, first: bool, persona: str) -> Request:
        row = self.next_row()
        req = Request(self.gen.next_id("q"), -1, row.prompt)
        gap = 0.0 if first else s.rng.uniform(10, 300)
        return self.show_row(s, req, row, gap, persona in self.SINGLE)

    def regenerate(self, s: Session, req: Request, poor: Shown) -> Shown | None:
        if not req.spare:
            return None
        fresh = req.spare.pop()
        return s.show(req, poor.position, fresh.perceived, s.rng.uniform(1, 8), fresh)

    def edit(self, s: Session, req: Request, target: Shown) -> str | None:
        """The user rewrites the answer into the row's other one (its truth goes with it)."""
        if not req.spare:
            return None
        self.gen.quality[f"{target.response_id}:edit"] = req.spare[0].truth
        return req.spare[0].text

    def reformulate(self, s: Session, req: Request, same: bool) -> Request:
        if same and req.spare:
            prompt, spare = rephrase(req.prompt, s.rng), req.spare.pop()
            new = Request(s.reformulate(req, prompt), -1, prompt)
            s.show(new, 0, spare.perceived, s.rng.uniform(1, 5), spare)
            return new
        row = self.next_row()
        new = Request(s.reformulate(req, row.prompt), -1, row.prompt)
        return self.show_row(s, new, row, s.rng.uniform(1, 5), single=False)

