"""Entity-level precision, recall and F1 exactly as the CoNLL shared tasks' ``conlleval`` script
computes them (its default mode: chunk tags B, I, E, O and the bracket tags [ ], types after a dash).

A chunk counts as correct only when the gold and the guessed chunk start at the same token, end at
the same token and have the same type. IOB1 and IOB2 input are both handled, as in the script: an
I-X after O or after another type starts a chunk. Sentences are separated by a boundary that ends
every open chunk (the script's ``-X- O O`` line).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


def _split(label: str) -> tuple[str, str]:
    tag, dash, kind = label.partition("-")
    return (tag, kind) if dash else (label, "")


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    """Whether a chunk ended between the previous token and this one (conlleval's endOfChunk)."""
    return (
        (prev_tag == "B" and tag in ("B", "O"))
        or (prev_tag == "I" and tag in ("B", "O"))
        or (prev_tag == "E" and tag in ("E", "I", "O"))
        or (prev_tag not in ("O", ".") and prev_type != kind)
        or prev_tag in ("]", "[")
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    """Whether a chunk starts at this token (conlleval's startOfChunk)."""
    return (
        (tag == "B" and prev_tag in ("B", "I", "O"))
        or (prev_tag == "E" and tag in ("E", "I"))
        or (prev_tag == "O" and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != kind)
        or tag in ("[", "]")
    )


@dataclass
class ChunkScores:
    precision: float  # percent, as conlleval prints them
    recall: float
    f1: float
    accuracy: float  # token accuracy, percent
    found_guessed: int
    found_correct: int
    correct_chunks: int
    tokens: int
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)


def _prf(correct: int, guessed: int, gold: int) -> tuple[float, float, float]:
    p = 100.0 * correct / guessed if guessed else 0.0
    r = 100.0 * correct / gold if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def conlleval(gold: Sequence[Sequence[str]], guessed: Sequence[Sequence[str]]) -> ChunkScores:
    """Scores of ``guessed`` tag sequences against ``gold`` ones (one list of tags per sentence)."""
    if len(gold) != len(guessed):
        raise ValueError(f"{len(gold)} gold sentences but {len(guessed)} guessed")
    correct_chunk = found_correct = found_guessed = correct_tags = tokens = 0
    by_type: Counter[tuple[str, str]] = Counter()
    in_correct = False
    last_c, last_g, last_ct, last_gt = "O", "O", "", ""
    stream: list[tuple[str, str, bool]] = []
    for n, (g_sent, p_sent) in enumerate(zip(gold, guessed, strict=True)):
        if len(g_sent) != len(p_sent):
            raise ValueError(f"sentence {n}: {len(g_sent)} gold tags but {len(p_sent)} guessed")
        stream.extend((g, p, False) for g, p in zip(g_sent, p_sent, strict=True))
        stream.append(("O", "O", True))  # the sentence boundary
    for gold_label, guess_label, boundary in stream:
        c, ct = _split(gold_label)
        g, gt = _split(guess_label)
        if in_correct:
            c_end = _end_of_chunk(last_c, c, last_ct, ct)
            g_end = _end_of_chunk(last_g, g, last_gt, gt)
            if c_end and g_end and last_gt == last_ct:
                in_correct = False
                correct_chunk += 1
                by_type[("correct", last_ct)] += 1
            elif c_end != g_end or gt != ct:
                in_correct = False
        c_start = _start_of_chunk(last_c, c, last_ct, ct)
        g_start = _start_of_chunk(last_g, g, last_gt, gt)
        if c_start and g_start and gt == ct:
            in_correct = True
        if c_start:
            found_correct += 1
            by_type[("gold", ct)] += 1
        if g_start:
            found_guessed += 1
            by_type[("guessed", gt)] += 1
        if not boundary:
            correct_tags += int(c == g and ct == gt)
            tokens += 1
        last_c, last_g, last_ct, last_gt = c, g, ct, gt
    if in_correct:
        correct_chunk += 1
        by_type[("correct", last_ct)] += 1
    p, r, f = _prf(correct_chunk, found_guessed, found_correct)
    types = sorted({t for (_, t) in by_type if t})
    per_type = {}
    for t in types:
        tp, tr, tf = _prf(by_type[("correct", t)], by_type[("guessed", t)], by_type[("gold", t)])
        per_type[t] = {"precision": tp, "recall": tr, "f1": tf, "found": by_type[("guessed", t)]}
    return ChunkScores(
        precision=p,
        recall=r,
        f1=f,
        accuracy=100.0 * correct_tags / tokens if tokens else 0.0,
        found_guessed=found_guessed,
        found_correct=found_correct,
        correct_chunks=correct_chunk,
        tokens=tokens,
        per_type=per_type,
    )
