"""The ``comparisons`` view: stored pairs grouped into comparisons with votes each way.

One row per (prompt, unordered pair of answers): the votes for each answer, distinct users and
sessions, the votes' mean confidence clipped to [0.5, 0.99] (``reliability``), the aggregate
confidence ``sigmoid(|votes_a - votes_b| * logit(reliability))``, the majority's answer (``a``,
``b`` or ``tie``: a tie is not trained on) and whether the comparison is ``contradicted`` (votes
both ways).
``answer_a`` is the smaller text in byte order. The trainer computes the same aggregate
(``trainer/comparisons.py``; see ``docs/reward-model.md``).
"""

COMPARISONS_SQL = """
    WITH votes AS (
        SELECT prompt, least(chosen, rejected) AS answer_a, greatest(chosen, rejected) AS answer_b,
               chosen < rejected AS for_a, user_id, session_id, event_time, partition,
               confidence
        FROM pairs
    ), agg AS (
        SELECT prompt, answer_a, answer_b,
               count(*) AS votes,
               count(*) FILTER (WHERE for_a) AS votes_a,
               count(*) FILTER (WHERE NOT for_a) AS votes_b,
               count(DISTINCT user_id) AS users,
               count(DISTINCT session_id) AS sessions,
               least(greatest(avg(confidence), 0.5), 0.99) AS reliability,
               min(event_time) AS first_vote, max(event_time) AS last_vote,
               list(DISTINCT partition ORDER BY partition) AS partitions
        FROM votes GROUP BY prompt, answer_a, answer_b
    )
    SELECT prompt, answer_a, answer_b, votes, votes_a, votes_b, users, sessions, reliability,
           1 / (1 + exp(-abs(votes_a - votes_b) * ln(reliability / (1 - reliability))))
               AS confidence,
           CASE WHEN votes_a > votes_b THEN 'a' WHEN votes_a < votes_b THEN 'b' ELSE 'tie' END
               AS majority,
           votes_a > 0 AND votes_b > 0 AS contradicted,
           first_vote, last_vote, partitions
    FROM agg
"""
