"""How each kind of simulated user acts on what it was shown (careful rater, copier,
position-biased clicker, regenerator, editor, reformulator, abandoner, tie maker), and one whole
session of one behaviour (:func:`build_session`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from prefstream.schemas.events import (
    Click,
    Copy,
    Edit,
    FeedbackEvent,
    Regenerate,
    SessionEnd,
    ThumbsDown,
    ThumbsUp,
)
from prefstream.sim.users import Gen, Request, Session, Shown

SESSION_END_P = 0.8


def _best(req: Request) -> Shown:
    return max(req.shown, key=lambda s: s.quality)


def _worst(req: Request) -> Shown:
    return min(req.shown, key=lambda s: s.quality)


def _careful(s: Session, req: Request) -> None:
    flip = s.rng.random() < s.gen.content.flip_p  # noise: the rater gets it backwards
    s.gen.counts["careful_flipped"] += flip
    if len(req.shown) == 1:
        up = (req.shown[0].quality >= 0.5) != flip
        s.signal(ThumbsUp if up else ThumbsDown, req, req.shown[0])
        return
    best, worst = (_worst(req), _best(req)) if flip else (_best(req), _worst(req))
    s.signal(ThumbsUp, req, best)
    s.signal(ThumbsDown, req, worst)


def _copier(s: Session, req: Request) -> None:
    best = _best(req)
    if s.rng.random() < best.quality:
        s.signal(Copy, req, best)
    else:
        s.gen.counts["copier_no_copy"] += 1


def _clicker(s: Session, req: Request) -> None:
    for shown in req.shown:
        if s.rng.random() < 1 / (shown.position + 1) and s.rng.random() < shown.quality:
            good = shown.quality >= 0.5
            dwell = s.rng.randint(8_000, 60_000) if good else s.rng.randint(200, 2_900)
            s.signal(Click, req, shown, dwell_ms=dwell)


def _regenerator(s: Session, req: Request) -> None:
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


def _editor(s: Session, req: Request) -> None:
    target = min(req.shown, key=lambda x: abs(x.quality - 0.5))
    text = s.gen.content.edit(s, req, target)
    if text is not None:
        s.signal(Edit, req, target, edited_text=text)


def _reformulator(s: Session, req: Request) -> None:
    same = s.rng.random() < 0.6
    s.gen.counts["reformulate_same_intent" if same else "reformulate_new_intent"] += 1
    new = s.gen.content.reformulate(s, req, same)
    s.signal(Copy if s.rng.random() < 0.5 else ThumbsUp, new, _best(new))


def _tie(s: Session, req: Request) -> None:
    cls = ThumbsUp if s.rng.random() < 0.5 else ThumbsDown
    for shown in s.rng.sample(req.shown, min(2, len(req.shown))):
        s.signal(cls, req, shown)


BEHAVIOURS: dict[str, tuple[float, Callable[[Session, Request], None]]] = {
    "careful": (0.16, _careful), "copier": (0.14, _copier), "clicker": (0.20, _clicker),
    "regenerator": (0.10, _regenerator), "editor": (0.08, _editor), "tie": (0.10, _tie),
    "reformulator": (0.10, _reformulator), "abandoner": (0.12, lambda s, req: None),
}


def build_session(gen: Gen) -> tuple[Session, list[FeedbackEvent]]:
    rng, cfg = gen.rng, gen.config
    s = Session(gen, gen.next_id("s"), f"u{rng.randrange(cfg.n_users):04d}")
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

