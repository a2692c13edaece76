"""The synthesis plan: how many QA each discipline x grade cell gets, and from which seeds.

The rule (``pipeline.yaml`` ``plan``, the recipe named there or the first one):

1. Candidates. A cell's candidate (track, seed) pairs are those ``synthesized_qa`` may use (the synthesis
   rules of ``logic/synthesize.py``); its capacity is ``pairs x plan.max_qa_per_seed`` variants. A cell with no
   candidate seeds gets 0: there is nothing to synthesize from, and its share goes to the others.
2. Static weight. ``category_weights[category] x grade_weights[grade]`` of the recipe (a missing key weighs
   1), times ``stem_weight`` for STEM disciplines and ``high_difficulty_weight`` for high-difficulty grades.
3. Need. With a probe run: ``need = max(min_need, 1 - accuracy)`` for cells whose accuracy the probe measured
   (enough graded replies); cells it could not measure take the mean need of the measured ones. Without a
   probe run (or with no measured cell), need is 1 everywhere: the plan falls back to the static weights and
   says so (``basis``).
4. Allocation. ``weight = static weight x need``. The recipe's ``qa_budget`` is spread over cells with
   candidates: each first gets ``floor`` (at most its capacity), the rest goes in proportion to weight, no cell
   above ``min(cap, capacity)`` (what a full cell cannot take is shared among the others: water-filling);
   integers by largest remainder, ties broken by partition key. The same inputs give the same plan.
5. No ``qa_budget``: every candidate pair gets ``synthesis.qa_per_seed`` variants (``basis: unbudgeted``).

The seeds are streamed, never held (``SeedStream``): one pass counts them per (discipline, grade, difficulty),
which sizes every cell; pick passes of at most ``PICKS_PER_PASS`` seeds then keep each budgeted track's first
seeds, and the cells come out one at a time (``plan_cells``).

Each cell's ``fingerprint`` hashes what ``synthesized_qa`` will do there (budget, seeds and their
annotations, rule version): a cell whose fingerprint did not change needs no new synthesis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from boostqa_assets.configs import ProjectConfig
from boostqa_assets.logic import synthesize
from boostqa_assets.partitions import qa_key
from boostqa_assets.records import PLAN_SCHEMA, frame, stable_hash

PLAN_RULE_VERSION = "plan-v1"


@dataclass(frozen=True)
class CellNeed:
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    status: str


def allocate(
    weights: dict[str, float], capacity: dict[str, int], total: int, floor: int = 0, cap: int | None = None
) -> dict[str, int]:
    """Integer budgets summing to ``min(total, sum of upper bounds)``; see the module docstring (step 4)."""
    keys = sorted(weights)
    upper = {k: max(0, min(capacity.get(k, 0), cap if cap is not None else capacity.get(k, 0))) for k in keys}
    lower = {k: min(floor, upper[k]) for k in keys}
    if sum(lower.values()) > total:
        # Not even the floors fit: the floors become the upper bounds and the budget is shared by weight.
        upper, lower = lower, dict.fromkeys(keys, 0)
    total = min(total, sum(upper.values()))
    share = {k: float(lower[k]) for k in keys}
    remaining = float(total - sum(lower.values()))
    active = [k for k in keys if share[k] < upper[k] and weights[k] > 0]
    while remaining > 1e-9 and active:
        wsum = sum(weights[k] for k in active)
        spill = 0.0
        still = []
        for k in active:
            share[k] += remaining * weights[k] / wsum
            if share[k] >= upper[k]:
                spill += share[k] - upper[k]
                share[k] = float(upper[k])
            else:
                still.append(k)
        remaining, active = spill, still
    if remaining > 1e-9:
        # Only zero-weight cells have room left: share what is left equally among them.
        room = [k for k in keys if share[k] < upper[k]]
        while remaining > 1e-9 and room:
            each = remaining / len(room)
            remaining, nxt = 0.0, []
            for k in room:
                add = min(each, upper[k] - share[k])
                share[k] += add
                remaining += each - add
                if share[k] < upper[k]:
                    nxt.append(k)
            room = nxt
    out = {k: math.floor(share[k] + 1e-9) for k in keys}
    left = total - sum(out.values())
    by_remainder = sorted(keys, key=lambda k: (-(share[k] - out[k]), k))
    for k in by_remainder:
        if left <= 0:
            break
        if out[k] < upper[k]:
            out[k] += 1
            left -= 1
    return out


def probe_needs(cells: pl.DataFrame | None) -> dict[str, CellNeed]:
    """Measured cells of the probe table (``deficiency_probe``), by partition key."""
    if cells is None or cells.is_empty():
        return {}
    out = {}
    for r in cells.to_dicts():
        out[qa_key(r["discipline"], r["grade"])] = CellNeed(
            r.get("accuracy"), r.get("ci_low"), r.get("ci_high"), int(r.get("n_graded") or 0), r.get("status") or ""
        )
    return out


# What the plan reads of an annotated seed: its labels and ids (the texts stay on disk; 100k seeds with their
# texts, as dicts for each of a STEM discipline's 5 cells, took the plan to 1.6 GB).
SEED_COLUMNS = ["seed_id", "discipline", "grade", "difficulty", "annotate_request_hash"]

# Each call streams the annotated seeds (``SEED_COLUMNS``) once more, a frame at a time. The plan reads them
# twice: once to count every cell's candidates, once to pick the seeds the budgets use. Neither pass holds more
# than a frame and the picked seeds, so the plan's memory follows the budgets, not the seeds.
SeedStream = Callable[[], Iterable[pl.DataFrame]]


def seed_counts(frames: Iterable[pl.DataFrame]) -> dict[tuple[str, str, str], int]:
    """Seeds per (discipline, grade, difficulty): all a cell's candidate count depends on."""
    counts: dict[tuple[str, str, str], int] = {}
    for df in frames:
        for discipline, grade, difficulty, n in df.group_by("discipline", "grade", "difficulty").len().iter_rows():
            key = (discipline, grade, difficulty)
            counts[key] = counts.get(key, 0) + n
    return counts


@dataclass(frozen=True)
class TrackPick:
    """The first ``take`` seeds of one cell's track, in ``synthesize.candidates`` order: by ``seed_id``, or by
    the hash of ``salt`` and ``seed_id`` when the track is capped (``max_seeds_per_partition``)."""

    key: str
    discipline: str
    track: str
    takes: Callable[[str, str], bool]
    take: int
    salt: str | None


class _FirstRows:
    """The ``take`` lowest rows by ``_order`` of the frames added: at most 2 x take + one frame held."""

    def __init__(self, take: int) -> None:
        self.take = take
        self.frames: list[pl.DataFrame] = []
        self.rows = 0
        self.bound: str | None = None  # the take-th lowest order so far: nothing at or above it can enter

    def add(self, df: pl.DataFrame) -> None:
        if self.bound is not None:
            df = df.filter(pl.col("_order") < self.bound)
        if df.is_empty():
            return
        self.frames.append(df)
        self.rows += df.height
        if self.rows > 2 * self.take:
            self._prune()

    def _prune(self) -> None:
        kept = pl.concat(self.frames).sort("_order").head(self.take)
        self.frames, self.rows = [kept], kept.height
        if kept.height == self.take:
            self.bound = kept["_order"][-1]

    def result(self) -> pl.DataFrame:
        if not self.frames:
            return pl.DataFrame(schema={"seed_id": pl.String, "annotate_request_hash": pl.String})
        self._prune()
        return self.frames[0].drop("_order")


# The pick pass works on frames of this many seeds (the files' own batches joined): each frame costs a few
# polars calls per pick, so the stream's small batches (a part file each) made the pass 3x slower.
PICK_FRAME_ROWS = 65_536


def _rebatched(frames: Iterable[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    held: list[pl.DataFrame] = []
    n = 0
    for df in frames:
        held.append(df)
        n += df.height
        if n >= rows:
            yield pl.concat(held)
            held, n = [], 0
    if held:
        yield pl.concat(held)


# A pick pass holds at most this many picked seeds (twice that while pruning, ~100 B each): past it, the next
# cells are picked in another pass over the seeds. A 10^8-QA plan then takes ~100 passes, and no more memory.
PICKS_PER_PASS = 1_000_000


def first_seeds(frames: Iterable[pl.DataFrame], picks: list[TrackPick]) -> dict[tuple[str, str], pl.DataFrame]:
    """Each pick's seeds (``seed_id``, ``annotate_request_hash``, in order), by (cell key, track), in one streamed
    pass."""
    firsts = {(p.key, p.track): _FirstRows(p.take) for p in picks}
    by_discipline: dict[str, list[TrackPick]] = {}
    for p in picks:
        by_discipline.setdefault(p.discipline, []).append(p)
    for df in _rebatched(frames, PICK_FRAME_ROWS):
        for discipline, own in by_discipline.items():
            part = df.filter(pl.col("discipline") == discipline)
            if part.is_empty():
                continue
            combos = part.select("grade", "difficulty").unique()
            for p in own:
                # The track's test runs once per (grade, difficulty) present, not once per seed.
                allowed = combos.filter(pl.Series([p.takes(g, d) for g, d in combos.iter_rows()], dtype=pl.Boolean))
                rows = part.join(allowed, on=["grade", "difficulty"], how="semi").select(
                    "seed_id", "annotate_request_hash"
                )
                if p.salt is None:
                    order = rows["seed_id"]
                else:  # the hash is fixed-width: hash + seed_id sorts as (hash, seed_id)
                    order = pl.Series([stable_hash(p.salt, s) + s for s in rows["seed_id"]], dtype=pl.String)
                firsts[(p.key, p.track)].add(rows.with_columns(order.alias("_order")))
    return {k: f.result() for k, f in firsts.items()}


def plan_cells(seeds: SeedStream, probe_cells: pl.DataFrame | None, project: ProjectConfig) -> Iterator[dict[str, Any]]:
    """One row per discipline x grade cell (all of them, in partition-key order): budget, why, and from what.
    The rows come a pass at a time: a row's ``seed_ids`` (one per seed its budget uses) need not be held once the
    caller has written it, so a 10^8-QA plan never holds all of them."""
    tax = project.taxonomy
    syn = project.pipeline.synthesis
    cfg = project.pipeline.plan
    recipe = project.recipes.plan_recipe(cfg.recipe)
    probe_info = probe_needs(probe_cells)
    measured = {k: v for k, v in probe_info.items() if v.accuracy is not None}
    mean_need = (
        sum(max(cfg.min_need, 1.0 - v.accuracy) for v in measured.values()) / len(measured)  # type: ignore[operator]
        if measured
        else None
    )
    unbudgeted = recipe.qa_budget is None
    probed = bool(measured)
    counts = seed_counts(seeds())
    rows: list[dict[str, Any]] = []
    tracks_by_key: dict[str, list[tuple[str, Callable[[str, str], bool], int, bool]]] = {}
    for discipline in sorted(tax.discipline_names):
        own = [(g, d, n) for (disc, g, d), n in counts.items() if disc == discipline]
        for grade in sorted(tax.grades):
            key = qa_key(discipline, grade)
            tracks = []
            for track, takes in synthesize.track_rules(discipline, grade, tax, syn):
                n = sum(c for g, d, c in own if takes(g, d))
                capped = syn.max_seeds_per_partition is not None and n > syn.max_seeds_per_partition
                tracks.append((track, takes, min(n, syn.max_seeds_per_partition) if capped else n, capped))
            tracks_by_key[key] = tracks
            n_pairs = sum(t[2] for t in tracks)
            category = tax.category_of(discipline)
            is_stem = tax.is_stem(discipline)
            is_hd = grade in syn.high_difficulty_grades
            static = (
                recipe.category_weights.get(category, 1.0)
                * recipe.grade_weights.get(grade, 1.0)
                * (cfg.stem_weight if is_stem else 1.0)
                * (cfg.high_difficulty_weight if is_hd else 1.0)
            )
            info = probe_info.get(key)
            if unbudgeted:
                need, basis = 1.0, "unbudgeted"
            elif key in measured:
                need, basis = max(cfg.min_need, 1.0 - measured[key].accuracy), "probe"  # type: ignore[operator]
            elif probed:
                need, basis = float(mean_need), "probe_mean"  # type: ignore[arg-type]
            else:
                need, basis = 1.0, "static"
            capacity = n_pairs * (syn.qa_per_seed if unbudgeted else cfg.max_qa_per_seed)
            rows.append(
                {
                    "discipline": discipline,
                    "grade": grade,
                    "category": category,
                    "is_stem": is_stem,
                    "is_high_difficulty": is_hd,
                    "candidates": n_pairs,
                    "capacity": capacity,
                    "accuracy": info.accuracy if info else None,
                    "ci_low": info.ci_low if info else None,
                    "ci_high": info.ci_high if info else None,
                    "probe_n": info.n if info else 0,
                    "probe_status": info.status if info else "not_probed",
                    "static_weight": round(static, 6),
                    "need": round(need, 6),
                    "weight": round(static * need, 6),
                    "basis": basis,
                    "recipe": recipe.name,
                }
            )
    if unbudgeted:
        budgets = {qa_key(r["discipline"], r["grade"]): r["capacity"] for r in rows}
    else:
        budgets = allocate(
            {qa_key(r["discipline"], r["grade"]): r["weight"] for r in rows},
            {qa_key(r["discipline"], r["grade"]): r["capacity"] for r in rows},
            int(recipe.qa_budget),  # type: ignore[arg-type]
            cfg.floor,
            cfg.cap,
        )
    # The budget deals variant 0 of the pairs in order before any variant 1 (``synthesize.tasks_for``), so a cell
    # uses the first min(budget, pairs) of its pairs: its tracks in order, each track's first seeds.
    passes: list[tuple[list[dict[str, Any]], list[TrackPick]]] = [([], [])]
    for r in rows:
        key = qa_key(r["discipline"], r["grade"])
        r["budget"] = budgets[key]
        left = r["candidates"] if unbudgeted else min(r["budget"], r["candidates"])
        cell_picks = []
        for track, takes, n, capped in tracks_by_key[key]:
            take = min(left, n)
            left -= take
            if take:
                salt = synthesize.track_salt(r["discipline"], r["grade"], track) if capped else None
                cell_picks.append(TrackPick(key, r["discipline"], track, takes, take, salt))
        held = sum(p.take for p in passes[-1][1])
        if held and held + sum(p.take for p in cell_picks) > PICKS_PER_PASS:
            passes.append(([], []))
        passes[-1][0].append(r)
        passes[-1][1].extend(cell_picks)
    for cells, picks in passes:
        firsts = first_seeds(seeds(), picks) if picks else {}
        for r in cells:  # one cell's seeds as dicts at a time
            key = qa_key(r["discipline"], r["grade"])
            pairs = [
                (t[0], s)
                for t in tracks_by_key[key]
                if (key, t[0]) in firsts
                for s in firsts.pop((key, t[0])).to_dicts()
            ]
            used = synthesize.task_order(
                pairs, None if unbudgeted else r["budget"], syn.qa_per_seed if unbudgeted else cfg.max_qa_per_seed
            )
            r["seed_ids"] = json.dumps(sorted({seed["seed_id"] for _, seed, _ in used}))
            r["fingerprint"] = stable_hash(
                PLAN_RULE_VERSION,
                str(r["budget"]),
                json.dumps(
                    [[track, v, seed["seed_id"], seed.get("annotate_request_hash") or ""] for track, seed, v in used]
                ),
            )
            yield r


def build_plan(seeds: SeedStream, probe_cells: pl.DataFrame | None, project: ProjectConfig) -> pl.DataFrame:
    """The whole plan as one frame (``plan_cells``): for tests and small runs; it holds every cell's seed ids."""
    return frame(list(plan_cells(seeds, probe_cells, project)), PLAN_SCHEMA)


def cell_tasks(
    annotated: pl.DataFrame, cell: dict[str, Any], project: ProjectConfig
) -> tuple[list[synthesize.SynthTask], int]:
    """The synthesis tasks of one plan cell: its budget over the seeds it names (those still annotated), and
    how many of the named seeds are gone."""
    syn = project.pipeline.synthesis
    named = set(json.loads(cell["seed_ids"]))
    pairs = synthesize.candidates(annotated, cell["discipline"], cell["grade"], project.taxonomy, syn)
    pairs = [(t, s) for t, s in pairs if s["seed_id"] in named]
    missing = len(named - {s["seed_id"] for _, s in pairs})
    unbudgeted = cell["basis"] == "unbudgeted"
    variants = syn.qa_per_seed if unbudgeted else project.pipeline.plan.max_qa_per_seed
    tasks = synthesize.tasks_for(
        pairs, cell["discipline"], cell["grade"], None if unbudgeted else int(cell["budget"]), variants
    )
    return tasks, missing


def plan_basis(plan: pl.DataFrame) -> str:
    """One line saying what the plan's budgets rest on."""
    bases = set(plan["basis"].to_list()) if plan.height else set()
    if "unbudgeted" in bases:
        return "no qa_budget in the recipe: every candidate seed gets synthesis.qa_per_seed variants"
    if bases & {"probe", "probe_mean"}:
        n = plan.filter(pl.col("basis") == "probe").height
        return f"probe accuracies: {n} measured cells; unmeasured cells take the mean need of the measured ones"
    return "no probe run (or no cell with enough samples): the recipe's static weights alone"


def changed_cells(new_plan: pl.DataFrame, stored: dict[str, str]) -> list[str]:
    """Partition keys whose fingerprint differs from ``stored`` (key -> fingerprint; missing counts as changed)."""
    out = []
    for r in new_plan.select("discipline", "grade", "fingerprint").to_dicts():
        key = qa_key(r["discipline"], r["grade"])
        if stored.get(key) != r["fingerprint"]:
            out.append(key)
    return out
