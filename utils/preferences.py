"""Preference pairs from scored candidates (08_build_prefs.py) and preference accuracy on them (09_train_dpo.py).

Pairing rules (configs/algorithms/dpo.yaml, `preferences:`), per prompt:
- Each candidate gets a tier from its reward components: the first criterion of `tiers` it meets, best first
  (default exec_match > numeric_match > program_valid > format_ok > none, i.e. correct > numeric within the
  tolerance > valid program > valid JSON > invalid JSON).
- With `dedupe`, identical texts (after stripping whitespace) count once.
- If no candidate is correct (exec_match) and `add_gold_when_no_correct`, the gold answer
  (utils.prompts.answer_json(target_program, target_answer), scored by the same calculator) joins as a candidate.
- (chosen, rejected) is eligible when chosen's tier is higher (or equal, with `same_tier_pairs`), chosen's reward is
  higher, and reward(chosen) >= reward(rejected) + min_margin. Both must agree: a higher tier with a lower reward
  gives no pair.
- At most `max_pairs_per_prompt` pairs: eligible pairs ranked by margin, then tier gap; pairs whose two texts are
  both unused are taken first, then the rest in rank order (so a cap of 1 gives the best-vs-worst pair).
- A prompt without a pair gets one reason (NO_PAIR_REASONS, the first that applies).
check_pairs re-checks every pair's margin and raises PreferenceError on any violation.

Held-out split: whole prompts (by id, seeded shuffle) go to heldout_pairs.jsonl, so 09 measures preference
accuracy on prompts it never trained on.

Preference accuracy (09): sequence log-probabilities of chosen and rejected responses under the policy and under
the reference (the same model with its adapter disabled), tokenized as trl's DPOTrainer does (chat template,
completion = what prompt+response adds to the prompt). See preference_accuracy for the definitions.
"""
from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

from utils.finqa_data import read_jsonl_lines
from utils.runs import StageError

EPS = 1e-9  # reward arithmetic is in floats: 1.0 - 0.8 is 0.19999999999999996, which meets a 0.2 margin
TIER_CRITERIA = ("exec_match", "numeric_match", "program_valid", "format_ok")
TIER_LABELS = {"exec_match": "correct", "numeric_match": "numeric", "program_valid": "valid_program",
               "format_ok": "valid_json", None: "invalid_json"}
NO_PAIR_REASONS = {
    "no_candidates": "the prompt has no scored candidates",
    "single_unique_text": "every candidate is the same text (after dedupe)",
    "all_equal_reward": "every candidate has the same reward",
    "no_ordered_pair": "rewards differ, but no candidate beats another on both tier and reward "
                       "(same tier, or a higher tier with a lower reward)",
    "below_min_margin": "tier-and-reward ordered pairs exist, but none reaches min_margin",
}


class PreferenceError(StageError):
    """Bad pairing rules, inconsistent inputs, or a pair that breaks the margin rule."""


# ----------------------------------------------------------------------------------------------------------
# rules

@dataclass
class PairingRules:
    tiers: tuple = TIER_CRITERIA
    same_tier_pairs: bool = False
    min_margin: float = 0.2
    max_pairs_per_prompt: int = 4
    dedupe: bool = True
    add_gold_when_no_correct: bool = True
    heldout_fraction: float = 0.2
    histogram_bin_width: float = 0.1

    def __post_init__(self):
        self.tiers = tuple(self.tiers)
        unknown = [t for t in self.tiers if t not in TIER_CRITERIA]
        if unknown or len(set(self.tiers)) != len(self.tiers):
            raise PreferenceError(f"preferences.tiers must be distinct names from {', '.join(TIER_CRITERIA)}, "
                                  f"got {list(self.tiers)}")
        if not (isinstance(self.min_margin, (int, float)) and math.isfinite(self.min_margin)
                and self.min_margin > 0):
            raise PreferenceError(f"preferences.min_margin must be > 0 (a pair needs a better chosen), "
                                  f"got {self.min_margin}")
        if not isinstance(self.max_pairs_per_prompt, int) or self.max_pairs_per_prompt < 0:
            raise PreferenceError(f"preferences.max_pairs_per_prompt must be an integer >= 0 (0 = no cap), "
                                  f"got {self.max_pairs_per_prompt}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise PreferenceError(f"preferences.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not self.histogram_bin_width > 0:
            raise PreferenceError(f"preferences.histogram_bin_width must be > 0, got {self.histogram_bin_width}")
        self.min_margin = float(self.min_margin)

    @classmethod
    def from_config(cls, section: dict) -> "PairingRules":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise PreferenceError(f"unknown key(s) in preferences: {', '.join(unknown)} "
                                  f"(expected {', '.join(sorted(names))})")
        return cls(**section)

    def tier(self, score: dict) -> int:
        """len(tiers) for the best tier down to 0 for a candidate that meets no criterion."""
        for rank, criterion in enumerate(self.tiers):
            if score.get(criterion):
                return len(self.tiers) - rank
        return 0

    def tier_label(self, tier: int) -> str:
        return TIER_LABELS[self.tiers[len(self.tiers) - tier] if tier > 0 else None]


# ----------------------------------------------------------------------------------------------------------
# candidates and pairs of one prompt

@dataclass
class Candidate:
    text: str
    reward: float
    tier: int
    tier_label: str
    index: int | None           # position among 04's K candidates; None for the gold answer
    source: str = "candidate"   # "candidate" or "gold"
    exec_match: bool = False
    failure_reason: str | None = None
    copies: int = 1             # identical texts merged into this one by dedupe


def make_candidate(text: str, score: dict, rules: PairingRules, index: int | None,
                   source: str = "candidate") -> Candidate:
    tier = rules.tier(score)
    return Candidate(text=text, reward=float(score["total"]), tier=tier, tier_label=rules.tier_label(tier),
                     index=index, source=source, exec_match=bool(score.get("exec_match")),
                     failure_reason=score.get("failure_reason"))


def dedupe_candidates(candidates: list[Candidate]) -> tuple[list[Candidate], int]:
    """Identical texts (after stripping) once, the first kept; how many were dropped."""
    kept: dict[str, Candidate] = {}
    for candidate in candidates:
        key = candidate.text.strip()
        if key in kept:
            first = kept[key]
            if abs(first.reward - candidate.reward) > EPS:
                raise PreferenceError(f"one text scored twice differently ({first.reward} vs {candidate.reward}): "
                                      f"{key[:80]!r}")
            first.copies += 1
        else:
            kept[key] = candidate
    unique = list(kept.values())
    return unique, len(candidates) - len(unique)


@dataclass
class PromptPairs:
    """What pairing one prompt gave: its pairs, or the reason it has none."""

    pairs: list[dict]
    reason: str | None = None
    n_candidates: int = 0
    duplicates_removed: int = 0
    gold_added: bool = False
    gold_correct: bool | None = None
    n_eligible: int = 0          # eligible pairs before the cap


def _ordered(chosen: Candidate, rejected: Candidate, rules: PairingRules) -> bool:
    tier_ok = chosen.tier > rejected.tier or (rules.same_tier_pairs and chosen.tier == rejected.tier)
    return tier_ok and chosen.reward > rejected.reward + EPS


def select_pairs(eligible: list[tuple[Candidate, Candidate]], cap: int) -> list[tuple[Candidate, Candidate]]:
    """Largest margin first (then tier gap, then candidate order); pairs with two unused texts before the rest."""
    def position(c: Candidate) -> int:
        return -1 if c.index is None else c.index

    ranked = sorted(eligible, key=lambda p: (-(p[0].reward - p[1].reward), -(p[0].tier - p[1].tier),
                                             position(p[0]), position(p[1])))
    if not cap or len(ranked) <= cap:
        return ranked
    taken: list[int] = []
    used: set[int] = set()
    for rank, (chosen, rejected) in enumerate(ranked):  # first pass: both texts not in a taken pair yet
        if len(taken) < cap and id(chosen) not in used and id(rejected) not in used:
            taken.append(rank)
            used.update((id(chosen), id(rejected)))
    for rank in range(len(ranked)):  # then the rest, in rank order
        if len(taken) >= cap:
            break
        if rank not in taken:
            taken.append(rank)
    return [ranked[rank] for rank in sorted(taken)]


def pair_record(prompt_id: str, prompt, chosen: Candidate, rejected: Candidate) -> dict:
    """One line of pairs.jsonl: trl's conversational preference format (prompt messages; chosen and rejected as
    assistant message lists) plus the rewards and where each response came from."""
    return {
        "id": prompt_id,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "chosen_reward": chosen.reward,
        "rejected_reward": rejected.reward,
        "margin": round(chosen.reward - rejected.reward, 6),
        "chosen_tier": chosen.tier_label,
        "rejected_tier": rejected.tier_label,
        "chosen_source": chosen.source,
        "chosen_index": chosen.index,
        "rejected_index": rejected.index,
    }


def pair_prompt(prompt_id: str, prompt, candidates: list[Candidate], rules: PairingRules,
                gold: Callable[[], Candidate] | None = None) -> PromptPairs:
    """Pairs for one prompt. gold() builds the scored gold candidate; it is called only when no candidate is
    correct and rules.add_gold_when_no_correct."""
    result = PromptPairs(pairs=[], n_candidates=len(candidates))
    if not candidates:
        result.reason = "no_candidates"
        return result
    pool = list(candidates)
    if rules.add_gold_when_no_correct and gold is not None and not any(c.exec_match for c in pool):
        gold_candidate = gold()
        pool.append(gold_candidate)
        result.gold_added, result.gold_correct = True, gold_candidate.exec_match
    if rules.dedupe:
        pool, result.duplicates_removed = dedupe_candidates(pool)
    if len({c.text.strip() for c in pool}) < 2:
        result.reason = "single_unique_text"
        return result
    if max(c.reward for c in pool) - min(c.reward for c in pool) <= EPS:
        result.reason = "all_equal_reward"
        return result
    ordered = [(c, r) for c in pool for r in pool if c is not r and _ordered(c, r, rules)]
    if not ordered:
        result.reason = "no_ordered_pair"
        return result
    eligible = [(c, r) for c, r in ordered if c.reward - r.reward >= rules.min_margin - EPS]
    result.n_eligible = len(eligible)
    if not eligible:
        result.reason = "below_min_margin"
        return result
    result.pairs = [pair_record(prompt_id, prompt, c, r)
                    for c, r in select_pairs(eligible, rules.max_pairs_per_prompt)]
    return result


def check_pairs(pairs: Iterable[dict], min_margin: float) -> int:
    """Every pair: reward(chosen) >= reward(rejected) + min_margin and two different texts. Raises on the first
    violation (it would be a bug in the pairing code, never a property of the data); returns the count."""
    count = 0
    for count, pair in enumerate(pairs, 1):
        chosen, rejected = pair["chosen_reward"], pair["rejected_reward"]
        if not chosen >= rejected + min_margin - EPS:
            raise PreferenceError(f"pair {count} (id {pair['id']}) breaks the margin rule: reward(chosen) {chosen} "
                                  f"< reward(rejected) {rejected} + min_margin {min_margin}")
        if abs(pair["margin"] - (chosen - rejected)) > 1e-6:
            raise PreferenceError(f"pair {count} (id {pair['id']}): margin {pair['margin']} != {chosen} - {rejected}")
        if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
            raise PreferenceError(f"pair {count} (id {pair['id']}): chosen and rejected are the same text")
    return count


# ----------------------------------------------------------------------------------------------------------
# a whole candidates file

@dataclass
class PairingReport:
    n_prompts: int = 0
    n_prompts_with_pairs: int = 0
    n_pairs: int = 0
    n_candidates: int = 0
    duplicates_removed: int = 0
    eligible_pairs: int = 0          # before the per-prompt cap
    prompts_capped: int = 0
    gold_added: int = 0              # prompts where the gold answer joined the candidates
    gold_not_correct: int = 0        # ... whose gold answer did not score as correct
    gold_pairs: int = 0              # pairs with the gold answer as chosen
    no_pair_reasons: Counter = field(default_factory=Counter)
    pairs_by_tiers: Counter = field(default_factory=Counter)   # "correct>invalid_json": n

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["no_pair_reasons"] = dict(self.no_pair_reasons.most_common())
        out["pairs_by_tiers"] = dict(self.pairs_by_tiers.most_common())
        out["n_prompts_without_pairs"] = self.n_prompts - self.n_prompts_with_pairs
        return out


def _messages_ok(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)


def read_candidates(path: Path) -> list[dict]:
    """04's candidates.jsonl, each line checked: id, prompt messages, candidates (texts)."""
    rows = []
    for line_no, row in read_jsonl_lines(path):
        if not isinstance(row.get("id"), str) or not row["id"]:
            raise PreferenceError(f"{path}:{line_no}: no string 'id' (expected 04_generate_candidates.py's "
                                  f"candidates.jsonl)")
        if not _messages_ok(row.get("prompt")):
            raise PreferenceError(f"{path}:{line_no}: entry {row['id']}: 'prompt' is not a list of chat messages")
        if not isinstance(row.get("candidates"), list) or not all(isinstance(c, str) for c in row["candidates"]):
            raise PreferenceError(f"{path}:{line_no}: entry {row['id']}: 'candidates' is not a list of texts")
        rows.append(row)
    return rows


def read_scores(path: Path) -> list[dict]:
    """04's scores.jsonl, each line checked: id, index, a numeric total and the tier criteria as booleans."""
    scores = []
    for line_no, score in read_jsonl_lines(path):
        where = f"{path}:{line_no}"
        if not isinstance(score.get("id"), str):
            raise PreferenceError(f"{where}: no string 'id' (expected 04_generate_candidates.py's scores.jsonl)")
        index, total = score.get("index"), score.get("total")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise PreferenceError(f"{where}: entry {score['id']}: 'index' is not a candidate number, got {index!r}")
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total):
            raise PreferenceError(f"{where}: entry {score['id']}: 'total' is not a number, got {total!r}")
        for criterion in TIER_CRITERIA:
            if not isinstance(score.get(criterion, False), bool):
                raise PreferenceError(f"{where}: entry {score['id']}: '{criterion}' is not true/false, "
                                      f"got {score[criterion]!r}")
        scores.append(score)
    return scores


def join_scores(candidates_rows: list[dict], scores: list[dict]) -> list[list[dict]]:
    """scores.jsonl lines grouped per candidates.jsonl line, in candidate order; every candidate needs one."""
    by_key = {}
    for score in scores:
        by_key[(score["id"], int(score["index"]))] = score
    joined = []
    for row in candidates_rows:
        group = []
        for index in range(len(row["candidates"])):
            score = by_key.get((row["id"], index))
            if score is None:
                raise PreferenceError(f"scores.jsonl has no score for candidate {index} of {row['id']}")
            group.append(score)
        joined.append(group)
    return joined


def build_pairs(candidates_rows: list[dict], scores: list[dict], rules: PairingRules,
                gold_for: Callable[[str], Candidate] | None = None) -> tuple[list[dict], PairingReport]:
    """All pairs of 04's candidates.jsonl rows ({id, prompt, candidates}) and their scores.jsonl lines.

    gold_for(id) returns the scored gold candidate of a prompt (used only as the rules allow)."""
    report = PairingReport()
    pairs: list[dict] = []
    for row, group in zip(candidates_rows, join_scores(candidates_rows, scores)):
        candidates = [make_candidate(text, score, rules, index)
                      for index, (text, score) in enumerate(zip(row["candidates"], group))]
        gold = (lambda row_id=row["id"]: gold_for(row_id)) if gold_for is not None else None
        result = pair_prompt(row["id"], row["prompt"], candidates, rules, gold)
        report.n_prompts += 1
        report.n_candidates += result.n_candidates
        report.duplicates_removed += result.duplicates_removed
        report.eligible_pairs += result.n_eligible
        report.prompts_capped += int(result.n_eligible > len(result.pairs) > 0)
        report.gold_added += int(result.gold_added)
        report.gold_not_correct += int(result.gold_added and not result.gold_correct)
        if result.pairs:
            report.n_prompts_with_pairs += 1
        else:
            report.no_pair_reasons[result.reason] += 1
        for pair in result.pairs:
            report.gold_pairs += int(pair["chosen_source"] == "gold")
            report.pairs_by_tiers[f"{pair['chosen_tier']}>{pair['rejected_tier']}"] += 1
        pairs.extend(result.pairs)
    report.n_pairs = len(pairs)
    check_pairs(pairs, rules.min_margin)
    return pairs, report


def split_heldout(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by prompt id: a seeded shuffle of the ids, the first round(fraction * n) held out (at least
    one when fraction > 0 and there are two or more prompts; never all of them)."""
    ids = sorted({pair["id"] for pair in pairs})
    n_heldout = 0
    if fraction > 0 and len(ids) >= 2:
        n_heldout = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    random.Random(seed).shuffle(ids)
    heldout_ids = set(ids[:n_heldout])
    return ([p for p in pairs if p["id"] not in heldout_ids], [p for p in pairs if p["id"] in heldout_ids])


# ----------------------------------------------------------------------------------------------------------
# margins: histogram, plot, stats.txt

def margin_histogram(margins: list[float], width: float = 0.1, start: float = 0.0) -> dict[str, int]:
    """Counts per bin [lo, hi) of the given width, from the bin holding `start` (e.g. min_margin: nothing lies
    below it) up to the largest margin, empty bins kept."""
    if not margins:
        return {}
    first = math.floor(start / width + EPS)
    n_bins = max(1, math.floor(max(margins) / width + EPS) + 1 - first)
    counts = [0] * n_bins
    for margin in margins:
        counts[min(n_bins - 1, max(0, math.floor(margin / width + EPS) - first))] += 1
    decimals = max(0, -math.floor(math.log10(width))) if width < 1 else 0
    return {f"[{(first + i) * width:.{decimals}f}, {(first + i + 1) * width:.{decimals}f})": count
            for i, count in enumerate(counts)}


def plot_margin_histogram(histogram: dict[str, int], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = list(histogram) or ["(no pairs)"]
    ax.bar(range(len(labels)), list(histogram.values()) or [0], color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("reward(chosen) - reward(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_stats(report: PairingReport, rules: PairingRules, n_train: int, n_heldout: int,
                 train_prompts: int, heldout_prompts: int, histogram: dict[str, int], source: str) -> str:
    lines = [
        "Preference pairs (08_build_prefs.py)",
        f"candidates: {source}",
        "",
        "rules:",
        f"  tiers (best first): {' > '.join(TIER_LABELS[t] for t in rules.tiers)} > invalid_json",
        f"  same_tier_pairs: {rules.same_tier_pairs}   min_margin: {rules.min_margin}   "
        f"max_pairs_per_prompt: {rules.max_pairs_per_prompt or 'no cap'}",
        f"  dedupe: {rules.dedupe}   add_gold_when_no_correct: {rules.add_gold_when_no_correct}   "
        f"heldout_fraction: {rules.heldout_fraction}",
        "",
        f"prompts: {report.n_prompts} ({report.n_candidates} candidates, {report.duplicates_removed} duplicate texts "
        f"dropped)",
        f"prompts with pairs: {report.n_prompts_with_pairs}; without: {report.n_prompts - report.n_prompts_with_pairs}",
    ]
    for reason, count in report.no_pair_reasons.most_common():
        lines.append(f"  {count:6d}  {reason}: {NO_PAIR_REASONS.get(reason, reason)}")
    lines += [
        f"pairs: {report.n_pairs} (eligible before the cap: {report.eligible_pairs}; prompts capped: "
        f"{report.prompts_capped})",
        f"  train:   {n_train} pairs from {train_prompts} prompts (pairs.jsonl)",
        f"  heldout: {n_heldout} pairs from {heldout_prompts} prompts (heldout_pairs.jsonl)",
        f"gold answer added to {report.gold_added} prompts ({report.gold_not_correct} of them not scored correct); "
        f"{report.gold_pairs} pairs have it as chosen",
        "",
        "pairs by tiers (chosen>rejected):",
    ]
    lines += [f"  {count:6d}  {key}" for key, count in report.pairs_by_tiers.most_common()] or ["  (none)"]
    lines += ["", "margin histogram:"]
    peak = max(histogram.values(), default=0)
    for label, count in histogram.items():
        bar = "#" * (round(40 * count / peak) if peak else 0)
        lines.append(f"  {label:>12} {count:6d} {bar}")
    if not histogram:
        lines.append("  (no pairs)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# preference accuracy (09)

def response_token_ids(tokenizer, prompt: list[dict], response: list[dict], max_length: int | None):
    """(ids of prompt + response, index where the response starts), tokenized like trl's DPOTrainer: the chat
    template of the prompt with the generation prompt vs of prompt + response, the response starting where the
    two diverge; prompt + response cut to max_length from the end (keep_start). None when the prompt alone fills
    max_length (trl drops such pairs)."""
    def ids(messages, **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
        return list(out)

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = ids(list(prompt) + list(response))
    start = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        start += 1
    if max_length is not None:
        if start >= max_length:
            return None
        full = full[:max_length]
    return full, start


def sequence_logps(model, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int = 4,
                   reference: bool = False) -> list[tuple[float, int]]:
    """(sum of log-probs of the response tokens, number of response tokens) per (ids, start). reference=True
    disables the model's LoRA adapter (a PeftModel), which gives the reference policy's numbers."""
    import torch
    from utils.models import last_positions

    device = next(model.parameters()).device
    context = model.disable_adapter() if reference else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    results: list[tuple[float, int]] = []
    try:
        with torch.no_grad(), context:
            for begin in range(0, len(sequences), batch_size):
                batch = sequences[begin: begin + batch_size]
                width = max(len(ids) for ids, _ in batch)
                keep = max(len(ids) - start for ids, start in batch) + 1  # logits needed: response + 1
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                target_mask = torch.zeros((len(batch), width), dtype=torch.bool)
                for row, (ids, start) in enumerate(batch):  # left padding: responses end at the right edge
                    offset = width - len(ids)
                    input_ids[row, offset:] = torch.tensor(ids)
                    mask[row, offset:] = 1
                    target_mask[row, offset + start:] = True
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), logits_to_keep=last_positions(keep, width, device),
                               use_cache=False).logits
                logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)       # predicts the last keep-1 tokens
                targets = input_ids[:, width - keep + 1:].to(device)
                token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                valid = target_mask[:, width - keep + 1:].to(device)
                sums = (token_logps * valid).sum(-1).tolist()
                counts = valid.sum(-1).tolist()
                results.extend(zip(sums, counts))
    finally:
        if was_training:
            model.train()
    return results


def pair_logps(model, tokenizer, pairs: list[dict], max_length: int | None, batch_size: int = 4,
               reference: bool = False) -> list[dict | None]:
    """Per pair: chosen/rejected log-probs and token counts (None for a pair trl would drop as too long)."""
    sequences, owners = [], []
    for index, pair in enumerate(pairs):
        chosen = response_token_ids(tokenizer, pair["prompt"], pair["chosen"], max_length)
        rejected = response_token_ids(tokenizer, pair["prompt"], pair["rejected"], max_length)
        if chosen is None or rejected is None:
            continue
        sequences += [chosen, rejected]
        owners.append(index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scored = sequence_logps(model, sequences, pad_id, batch_size, reference)
    out: list[dict | None] = [None] * len(pairs)
    for k, index in enumerate(owners):
        (chosen_logp, chosen_n), (rejected_logp, rejected_n) = scored[2 * k], scored[2 * k + 1]
        out[index] = {"chosen_logp": chosen_logp, "rejected_logp": rejected_logp,
                      "chosen_tokens": chosen_n, "rejected_tokens": rejected_n}
    return out


def preference_accuracy(pairs: list[dict], policy: list[dict | None], reference: list[dict | None],
                        beta: float) -> dict:
    """Preference figures of a policy on pairs, given its and the reference's pair_logps.

    - logp_accuracy: fraction with log pi(chosen) > log pi(rejected) (sums over the response tokens): which
      response the policy itself finds more likely. The same definition before (pi = SFT) and after (pi = DPO)
      training, so the two are directly comparable.
    - logp_accuracy_per_token: the same with length-normalised (mean per-token) log-probs.
    - implicit_reward_accuracy: fraction with a positive DPO implicit reward margin
      beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))) (trl's rewards/accuracies). At step 0 the
      policy is the reference, every margin is 0 and this is 0 by construction.
    - mean_implicit_margin, by_source (logp_accuracy for pairs whose chosen is a candidate / the gold answer).
    """
    rows = [(pair, p, r) for pair, p, r in zip(pairs, policy, reference) if p is not None and r is not None]
    n = len(rows)
    if n == 0:
        return {"n_pairs": 0, "logp_accuracy": None, "logp_accuracy_per_token": None,
                "implicit_reward_accuracy": None, "mean_implicit_margin": None, "by_source": {}}
    margins = [beta * ((p["chosen_logp"] - r["chosen_logp"]) - (p["rejected_logp"] - r["rejected_logp"]))
               for _, p, r in rows]
    wins = [p["chosen_logp"] > p["rejected_logp"] for _, p, _ in rows]
    per_token = [p["chosen_logp"] / max(p["chosen_tokens"], 1) > p["rejected_logp"] / max(p["rejected_tokens"], 1)
                 for _, p, _ in rows]
    by_source: dict[str, dict] = {}
    for (pair, _, _), win in zip(rows, wins):
        entry = by_source.setdefault(pair.get("chosen_source", "candidate"), {"n_pairs": 0, "wins": 0})
        entry["n_pairs"] += 1
        entry["wins"] += int(win)
    return {
        "n_pairs": n,
        "logp_accuracy": round(sum(wins) / n, 5),
        "logp_accuracy_per_token": round(sum(per_token) / n, 5),
        "implicit_reward_accuracy": round(sum(m > 0 for m in margins) / n, 5),
        "mean_implicit_margin": round(sum(margins) / n, 6),
        "mean_logp_chosen": round(sum(p["chosen_logp"] for _, p, _ in rows) / n, 4),
        "mean_logp_rejected": round(sum(p["rejected_logp"] for _, p, _ in rows) / n, 4),
        "by_source": {k: {"n_pairs": v["n_pairs"], "logp_accuracy": round(v["wins"] / v["n_pairs"], 5)}
                      for k, v in sorted(by_source.items())},
    }
