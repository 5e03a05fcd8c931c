"""``prefstream demo`` as a user runs it: a subprocess, its JSON summary, its data dir."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from prefstream.schemas.events import EVENT_ADAPTER
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.catalog import connect_readonly
from prefstream.streams.core.pairing import normalize_prompt, prompt_similarity

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def demo(demo_run: dict) -> tuple[dict, Path]:
    """The session's demo run (tests/conftest.py): 1,500 events, seed 0, trained."""
    return demo_run["summary"], demo_run["data_dir"]


def sql(data_dir: Path, query: str) -> list[tuple]:
    con = connect_readonly(data_dir)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def test_summary_equals_the_views(demo: tuple[dict, Path]) -> None:
    summary, data_dir = demo
    assert summary["balanced"]
    assert summary["events_produced"] == (summary["events_accepted"]
                                          + summary["duplicates_ignored"]
                                          + summary["dead_lettered"] + summary["late"])
    one = lambda q: sql(data_dir, q)[0][0]  # noqa: E731
    assert summary["pairs"] == one("SELECT count(*) FROM pairs") > 0
    assert summary["ties"] == one("SELECT count(*) FROM ties")
    assert summary["unpaired"] == one("SELECT count(*) FROM unpaired")
    assert summary["sessions"] == one("SELECT count(*) FROM sessions")
    assert summary["dead_lettered"] == one("SELECT count(*) FROM dead_letters")
    assert summary["late"] == one("SELECT count(*) FROM late_events")
    assert sum(summary["refusals_by_reason"].values()) == one("SELECT count(*) FROM refusals")
    assert sum(summary["pairs_by_rule"].values()) == summary["pairs"]
    assert summary["partitions_sealed"] == summary["partitions"] > 1
    assert summary["dead_lettered"] == summary["generator"]["bad"]
    funnel = sql(data_dir, "SELECT sum(events), sum(sessions), sum(pairs) FROM funnel")
    assert funnel == [(summary["events_accepted"], summary["sessions"], summary["pairs"])]
    assert summary["ground_truth"]["precision"] > 0.75


def test_the_worker_metrics_endpoint_served_the_same_counts(demo: tuple[dict, Path]) -> None:
    summary, _ = demo
    metrics = summary["worker_metrics"]
    events = {k: v for k, v in metrics.items() if k.startswith("prefstream_events_total")}
    assert sum(events.values()) == summary["events_produced"]
    assert events['prefstream_events_total{outcome="dead_letter"}'] == summary["dead_lettered"]
    assert events['prefstream_events_total{outcome="late"}'] == summary["late"]
    pairs = sum(v for k, v in metrics.items() if k.startswith("prefstream_pairs_total"))
    assert pairs == summary["pairs"]


def test_no_stored_pair_breaks_the_pair_contract(demo: tuple[dict, Path]) -> None:
    """Exposure, same context and distinct answers, checked against the raw events."""
    summary, data_dir = demo
    end = datetime.fromisoformat(summary["traffic"]["end"])
    traffic = generate_traffic(TrafficConfig(
        n_events=summary["traffic"]["events"], seed=summary["traffic"]["seed"], end=end))
    shown: dict[tuple[str, str], tuple[datetime, str]] = {}
    for _, value in traffic.messages:
        try:
            event = EVENT_ADAPTER.validate_json(value)
        except ValueError:
            continue
        if event.ts > end:  # the generator's future-dated copies: dead-lettered, never shown
            continue
        if event.type == "impression":
            shown.setdefault((event.session_id, event.response_id), (event.ts, event.prompt))
    pairs = sql(data_dir, "SELECT session_id, rule, chosen, rejected, chosen_response_id, "
                          "rejected_response_id, event_time FROM pairs")
    for session_id, rule, chosen, rejected, chosen_id, rejected_id, event_time in pairs:
        assert chosen.strip() != rejected.strip()
        seen_at, rejected_prompt = shown[(session_id, rejected_id)]
        assert seen_at <= event_time, "the rejected answer was shown before the signal"
        if rule == "edit":
            continue
        chosen_at, chosen_prompt = shown[(session_id, chosen_id)]
        assert chosen_at <= event_time
        if rule == "reformulate_same_intent":
            assert prompt_similarity(chosen_prompt, rejected_prompt) >= 0.5
        else:
            assert normalize_prompt(chosen_prompt) == normalize_prompt(rejected_prompt)
