"""The model card (``README.md``) written into every model version folder.

Pure: built from the version's ``metadata.json`` content alone, so a card always describes
exactly what was saved: the data versions trained and evaluated on (partitions with their
content hashes), the gates and their verdicts, the metrics, and the input format the model
expects. docs/first-hour.md ("The model") documents the same format.
"""

from __future__ import annotations

from typing import Any

INPUT_FORMAT = """\
The model scores one answer to one prompt: tokenize **prompt and answer as a text pair**
(`tokenizer(prompt, answer)`: `[CLS] prompt [SEP] answer [SEP]` for BERT-style backbones) and
read the single logit; a higher reward means a better answer. Inputs longer than `max_length`
tokens were dropped from training; `prefstream score` truncates them (longest side first)."""

SNIPPET = """\
```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "{path}"
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
with torch.inference_mode():
    batch = tokenizer("How do I reverse a list?", "Use reversed(xs).", return_tensors="pt")
    print(model(**batch).logits[0, 0].item())  # = prefstream score --prompt ... --answer ...
```"""


def model_card(meta: dict[str, Any], *, path: str = "<data-dir>/models/current") -> str:
    """Markdown describing one saved version (``meta``: its metadata.json content)."""
    version = meta.get("version", "?")
    lines = [f"# prefstream reward model {version}", "",
             f"Bradley-Terry reward model trained by prefstream on implicit preference pairs; "
             f"backbone `{meta.get('backbone')}`, created {meta.get('created_at')}, "
             f"{'promoted' if meta.get('promoted') else 'not promoted'}.", "",
             "## Intended input", "", INPUT_FORMAT, "", SNIPPET.format(path=path), "",
             "## Data versions", "", f"Cutoff {meta.get('cutoff')}: training uses sealed "
             "partitions strictly older, evaluation the newest window.", "",
             "| role | partition | sha256 |", "|---|---|---|"]
    for role, parts in (meta.get("partitions") or {}).items():
        lines += [f"| {role} | {p.get('partition')} | `{p.get('sha256')}` |" for p in parts]
    lines += ["", f"Pairs: {meta.get('n_train')} train, {meta.get('n_eval')} held out.", "",
              "## Gates", "", "| gate | passed | reason |", "|---|---|---|"]
    for name, gate in (meta.get("gates") or {}).items():
        lines.append(f"| {name} | {gate.get('passed')} | {gate.get('reason', '')} |")
    lines += ["", "## Metrics (held-out window)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _metrics(meta)]
    return "\n".join(lines) + "\n"


def _metrics(meta: dict[str, Any]) -> list[tuple[str, Any]]:
    metrics = meta.get("metrics") or {}
    held = metrics.get("eval") or {}
    reward = held.get("reward") or {}
    return [
        ("held-out accuracy", _num(held.get("accuracy"))),
        ("length-matched accuracy", _num((held.get("length_matched") or {}).get("accuracy"))),
        ("mean margin", _num(held.get("mean_margin"))),
        ("reward mean / std", f"{_num(reward.get('mean'))} / {_num(reward.get('std'))}"),
        ("calibration agreement",
         _num(((meta.get("gates") or {}).get("calibration") or {}).get("agreement"))),
        ("reward-hacking probes raised", _num((metrics.get("probes") or {}).get("overall_rate"))),
        ("max_length (tokens)", (meta.get("config") or {}).get("max_length")),
    ]


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
