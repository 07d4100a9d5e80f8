"""The stochastic reference writer: answers to the three tasks from catalog facts.

Variety comes from four sources, each on purpose:
  * many sentence patterns per slot (opener, attribute, audience, price, closer ...), in
    varied number and order (each voice has a usual order, broken a quarter of the time);
  * synonyms;
  * attribute-dependent clauses (each attribute value maps to one of the category's benefits,
    so "breathable mesh upper" always reads with the same benefit: a learnable fact);
  * a *voice* per pool: each category (each vertical, for user summaries) uses its own subset
    of patterns and synonyms plus its own nouns, benefits and uses. Texts of one pool share
    phrasing that other pools lack, which is what makes per-pool draft tries pay (DARE).

A voice is a pure function of (pool key, style seed); an answer of (facts, voice, rng).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from common.workload.catalog import Item
from common.workload.facts import HistoryProfile, RankedPick
from common.workload.lexicon import PERSON_NOUNS, CategorySpec, category_by_key

# ---- pattern pools -------------------------------------------------------------------------
# Fields: see _item_fields / _summary_fields / _rec_fields. A voice keeps a subset of each pool.

ITEM_OPENERS = (
    "{title} is a {great} {noun} for {audience}.",
    "Meet the {title}, a {great} {noun} from {brand}.",
    "Looking for a {noun} that {offers} {benefit}? The {title} is it.",
    "The {title} from {brand} {offers} {benefit} for {use}.",
    "{brand} built the {title} around {benefit}.",
    "Say hello to the {title}: {benefit} in a {great} {noun}.",
    "If {use} is on your list, the {title} by {brand} belongs on it too.",
    "Few {category} match the {title} for {benefit}.",
    "The {title} is {brand}'s answer to {use}.",
    "{title}: a {noun} that {offers} {benefit}.",
    "With the {title}, {brand} {offers} {benefit} at a {price_word} price.",
    "Here is why the {title} {shines} among {category}.",
    "This {noun} from {brand}, the {title}, is all about {benefit}.",
    "The {title} makes {use} easier.",
    "Discover the {title}, {brand}'s {great} pick for {audience}.",
    "Built for {use}, the {title} {offers} {benefit}.",
)
ITEM_ATTRIBUTE_LINES = (
    "Its {attr1} {offers} {ab1}.",
    "The {attr1} and the {attr2} {combine} for {ab2}.",
    "Key features: {attr1}, {attr2} and {attr3}.",
    "Thanks to the {attr1}, expect {ab1}.",
    "A {attr1} means {ab1}.",
    "It comes with a {attr1}, so you get {ab1}.",
    "The {val1} {label1} is a {great} touch.",
    "Highlights include the {attr1} and the {attr2}.",
    "You get a {attr2} plus a {attr3}.",
    "{ab1} comes from the {attr1}.",
    "Choose it for the {attr1}: {ab1}.",
    "On the spec sheet: {attr1}, {attr2}, {attr3}.",
    "The {attr2} adds {ab2}.",
    "Its {label1} is {val1}, which helps with {use}.",
    "Pair the {attr1} with the {attr3} and you have {ab3}.",
    "Details matter here: a {attr1} and a {attr2}.",
)
ITEM_AUDIENCE_LINES = (
    "It suits {audience} who want {benefit}.",
    "{ideal} for {use}.",
    "Made with {audience} in mind, it handles {use} with ease.",
    "{audience} will {love} it for {use}.",
    "Use it for {use} or {use2}.",
    "A {great} choice for {audience}.",
    "From {use} to {use2}, it keeps up.",
    "It fits the routine of {audience}.",
    "Think {use}, {use2} and everything in between.",
    "Aimed at {audience}, it {shines} during {use}.",
)
ITEM_PRICE_LINES = (
    "At a {price_word} price, it is {value_phrase}.",
    "{price_word} and {value_phrase}.",
    "The {price_word} price makes it {value_phrase}.",
    "It sits in the {band} band and is {value_phrase}.",
    "For a {price_word} price you get {benefit}.",
    "Priced {band}, it is {value_phrase}.",
    "Value check: {price_word} price, {value_phrase}.",
    "{value_phrase} at a {price_word} price.",
)
ITEM_CLOSERS = (
    "{cta} the {title} today.",
    "{cta} yours now and enjoy {benefit}.",
    "Ready for {use}? {cta} the {title}.",
    "{brand} fans, this one is for you.",
    "Do not miss the {title}.",
    "{cta} now while stock lasts.",
    "Give {use} an upgrade with the {title}.",
    "Your next {noun} is here.",
    "{cta} it and feel the difference.",
    "One look at the {title} and you will see why.",
)

SUMMARY_TOP_LINES = (
    "This {person} keeps coming back to {top_cat}, with {k} of the last {n} clicks there.",
    "Most of the recent clicks ({k} of {n}) go to {top_cat}.",
    "The history is led by {top_cat}: {k} out of {n} clicks.",
    "The strongest signal is {top_cat}, clicked {k} times.",
    "A clear {top_cat} fan: {k} of {n} recent clicks.",
    "Interest centres on {top_cat}, with {k} clicks out of {n}.",
    "Recent activity points to {top_cat} first ({k} of {n}).",
    "Expect this {person} to engage with {top_cat}; {k} of {n} clicks land there.",
)
SUMMARY_LOYAL_LINES = (
    "{top_brand} shows up {brand_k} times, so brand loyalty is real.",
    "{top_brand} is a favourite brand.",
    "There is a soft spot for {top_brand}.",
    "Clicks return to {top_brand} again and again.",
    "{top_brand} is the brand to lead with.",
)
SUMMARY_BROWSER_LINES = (
    "No single brand dominates.",
    "Brand loyalty looks weak; this {person} shops around.",
    "Brands vary from click to click.",
    "The brands are spread out, so the category matters more than the label.",
)
SUMMARY_PRICE_LINES = (
    "Spending leans {band}.",
    "Price-wise, most clicks sit in the {band} band.",
    "Most picks are {price_word}.",
    "The budget looks {band}.",
    "Expect a {band} budget.",
)
SUMMARY_SECOND_LINES = (
    "There is also some interest in {cat2}.",
    "{cat2} appear as a second theme.",
    "Secondary interest: {cat2}.",
    "A few clicks go to {cat2} as well.",
    "{cat2} come up now and then too.",
)
SUMMARY_FOCUSED_LINES = (
    "The history is narrowly focused.",
    "Little else competes for attention.",
    "Nothing else comes close.",
)
SUMMARY_RECENT_LINES = (
    "The latest click was the {newest}.",
    "Most recently: the {newest}.",
    "Last seen browsing the {newest}.",
    "The newest click, the {newest}, fits the pattern.",
)
SUMMARY_ANGLE_LINES = (
    "Ads that stress {benefit} for {use} should land well.",
    "Best angle: {benefit}.",
    "Pitch {top_cat} for {use}.",
    "Creative about {benefit} is likely to convert.",
    "Lead with {benefit} and {use}.",
    "Show {top_cat} that promise {benefit}.",
)

REC_LINES = (
    "Top pick: {t1}, because {reason}. Next come {t2} and {t3}.",
    "I would show {t1} first: {reason}. {t2} ranks second and {t3} third.",
    "1. {t1}, as {reason}. 2. {t2}. 3. {t3}.",
    "Best match is {t1}; {reason}. Runners-up: {t2}, then {t3}.",
    "Rank {t1} on top since {reason}, then {t2}, then {t3}.",
    "{t1} leads the list because {reason}. After it: {t2} and {t3}.",
    "Lead with {t1}. Reason: {reason}. Follow with {t2} and {t3}.",
    "First {t1}, since {reason}; second {t2}; third {t3}.",
)
REC_EXTRA_LINES = (
    "{t1} also {offers} {benefit}.",
    "It is a {great} {noun} for {use}.",
    "Its {attr1} {offers} {ab1}.",
    "All three suit {use}.",
    "{t2} is a safe second choice for {use}.",
    "Expect a click on {t1}.",
)
REASONS = {
    "brand": (
        "the user has clicked {brand} {brand_k} times",
        "{brand} is already a favourite",
        "it matches the user's taste for {brand}",
        "the history shows {brand} loyalty",
    ),
    "price": (
        "it sits in the {band} band the user prefers",
        "its {price_word} price matches past clicks",
        "the user mostly buys {band}",
    ),
    "category": (
        "{category} lead the recent clicks",
        "the history is full of {category}",
        "the user keeps browsing {category}",
    ),
    "popular": (
        "it is one of the most popular {category} right now",
        "nothing in the history points elsewhere and it sells well",
        "it is a best seller with broad appeal",
    ),
}

SYNONYMS = {
    "great": ("great", "excellent", "solid", "smart", "standout", "reliable", "superb", "strong", "clever"),
    "offers": ("offers", "delivers", "brings", "gives you", "provides", "packs in"),
    "ideal": ("ideal", "perfect", "great", "made", "built", "just right"),
    "love": ("love", "appreciate", "enjoy", "value"),
    "combine": ("work together", "team up", "combine", "join forces"),
    "shines": ("stands out", "shines", "impresses", "excels"),
}

PRICE_WORDS = {
    "budget": ("wallet-friendly", "affordable", "budget-friendly", "friendly"),
    "mid-range": ("fair", "sensible", "mid-range", "reasonable"),
    "premium": ("premium", "high-end", "upmarket"),
    "luxury": ("luxury", "top-tier", "exclusive"),
}
VALUE_PHRASES = {
    "budget": ("a steal", "great value", "an easy yes", "hard to beat"),
    "mid-range": ("good value", "money well spent", "a balanced buy", "a smart buy"),
    "premium": ("worth the splurge", "an investment that lasts", "quality you can feel"),
    "luxury": ("pure indulgence", "a statement buy", "luxury without compromise"),
}

# Slots whose order varies; a voice has a usual order of them (its own), used with
# probability _USUAL_ORDER_SHARE, and a random order otherwise. A fully random order on
# every answer makes "which sentence comes next" a coin toss, and a small model decoding
# greedily then repeats sentences; a per-voice habit keeps variety across pools and within.
_ORDERED_SLOTS = ("attribute", "audience", "price", "brand", "second", "recent")
_USUAL_ORDER_SHARE = 0.75

# How many patterns of each pool a voice keeps.
_VOICE_SIZES = {"openers": 6, "attribute": 7, "audience": 5, "price": 4, "closers": 5}
_SYNONYMS_PER_VOICE = 3


@dataclass(slots=True, frozen=True)
class Voice:
    """One pool's writing style: its subset of each pattern pool and of each synonym set."""

    pool_key: str
    patterns: dict[str, tuple[str, ...]]
    synonyms: dict[str, tuple[str, ...]]
    # The voice's usual order of the middle slots (see _ORDERED_SLOTS).
    slot_order: tuple[str, ...]


def _pool_rng(pool_key: str, style_seed: int) -> np.random.Generator:
    # crc32, not hash(): stable across processes (PYTHONHASHSEED).
    return np.random.default_rng([style_seed, zlib.crc32(pool_key.encode())])


def _subset(rng: np.random.Generator, pool: tuple[str, ...], size: int) -> tuple[str, ...]:
    picked = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
    return tuple(pool[i] for i in sorted(picked))


def _slot_order(rng: np.random.Generator) -> tuple[str, ...]:
    return tuple(_ORDERED_SLOTS[i] for i in rng.permutation(len(_ORDERED_SLOTS)))


def _voice_synonyms(rng: np.random.Generator) -> dict[str, tuple[str, ...]]:
    return {name: _subset(rng, words, _SYNONYMS_PER_VOICE) for name, words in SYNONYMS.items()}


def item_voice(spec: CategorySpec, style_seed: int) -> Voice:
    """The voice of a category pool: item knowledge and generative rec answers."""
    rng = _pool_rng(spec.key, style_seed)
    pools = {
        "openers": ITEM_OPENERS,
        "attribute": ITEM_ATTRIBUTE_LINES,
        "audience": ITEM_AUDIENCE_LINES,
        "price": ITEM_PRICE_LINES,
        "closers": ITEM_CLOSERS,
    }
    patterns = {name: _subset(rng, pool, _VOICE_SIZES[name]) for name, pool in pools.items()}
    patterns["rec"] = _subset(rng, REC_LINES, 4)
    patterns["rec_extra"] = _subset(rng, REC_EXTRA_LINES, 4)
    for reason, pool in REASONS.items():
        patterns[f"reason_{reason}"] = _subset(rng, pool, 2)
    return Voice(spec.key, patterns, synonyms=_voice_synonyms(rng), slot_order=_slot_order(rng))


def user_voice(vertical: str, style_seed: int) -> Voice:
    """The voice of a user pool ("users/<vertical>"): user summary answers."""
    pool_key = f"users/{vertical}"
    rng = _pool_rng(pool_key, style_seed)
    pools = {
        "top": (SUMMARY_TOP_LINES, 4),
        "loyal": (SUMMARY_LOYAL_LINES, 3),
        "browser": (SUMMARY_BROWSER_LINES, 2),
        "price": (SUMMARY_PRICE_LINES, 3),
        "second": (SUMMARY_SECOND_LINES, 3),
        "focused": (SUMMARY_FOCUSED_LINES, 2),
        "angle": (SUMMARY_ANGLE_LINES, 4),
        "recent": (SUMMARY_RECENT_LINES, 2),
        "person": (PERSON_NOUNS[vertical], 2),
    }
    patterns = {name: _subset(rng, pool, size) for name, (pool, size) in pools.items()}
    return Voice(pool_key, patterns, synonyms=_voice_synonyms(rng), slot_order=_slot_order(rng))


# ---- answers -------------------------------------------------------------------------------


def write_item_knowledge(item: Item, voice: Voice, rng: np.random.Generator) -> str:
    """An item's selling points: opener, 1-2 attribute lines, audience, price, closer.

    The middle sentences follow the voice's usual order, or a random one (see _arrange);
    audience, price and closer are optional.
    """
    spec = category_by_key(item.category_key)
    fields = _item_fields(item, spec, voice, rng)
    attribute_lines = [_pick(voice, "attribute", rng)]
    if rng.random() < 0.5:
        attribute_lines.append(_pick(voice, "attribute", rng, avoid=attribute_lines))
    middle = {"attribute": attribute_lines}
    if rng.random() < 0.8:
        middle["audience"] = [_pick(voice, "audience", rng)]
    if rng.random() < 0.6:
        middle["price"] = [_pick(voice, "price", rng)]
    sentences = [_pick(voice, "openers", rng)] + _arrange(middle, voice, rng)
    if rng.random() < 0.7:
        sentences.append(_pick(voice, "closers", rng))
    return _render(sentences, fields)


def write_user_summary(profile: HistoryProfile, voice: Voice, rng: np.random.Generator) -> str:
    """A user's interests: top category first; brand, price, second theme and newest click in
    the voice's usual order or a random one; the ad angle last."""
    fields = _summary_fields(profile, voice, rng)
    middle = {"brand": [_pick(voice, "loyal" if profile.top_brand_clicks >= 2 else "browser", rng)]}
    if rng.random() < 0.85:
        middle["price"] = [_pick(voice, "price", rng)]
    middle["second"] = [_pick(voice, "second" if profile.second_category else "focused", rng)]
    if rng.random() < 0.6:
        middle["recent"] = [_pick(voice, "recent", rng)]
    sentences = [_pick(voice, "top", rng)] + _arrange(middle, voice, rng)
    sentences.append(_pick(voice, "angle", rng))
    return _render(sentences, fields)


def write_generative_rec(picks: tuple[RankedPick, ...], voice: Voice, rng: np.random.Generator) -> str:
    """A ranked pick of (usually) three candidates with the reason for the first."""
    if not picks:
        raise ValueError("write_generative_rec needs at least one ranked pick")
    fields = _rec_fields(picks, voice, rng)
    if len(picks) < 3:
        # Too few candidates for the three-slot patterns: name what there is.
        names = ", then ".join(pick.item.title for pick in picks)
        return _render(["Ranked: " + names + ". The first wins because {reason}."], fields)
    sentences = [_pick(voice, "rec", rng), _pick(voice, "rec_extra", rng)]
    if rng.random() < 0.4:
        sentences.append(_pick(voice, "rec_extra", rng, avoid=sentences))
    return _render(sentences, fields)


# ---- fields --------------------------------------------------------------------------------


def attribute_benefit(spec: CategorySpec, label: str, value: str) -> str:
    """The category benefit an attribute value stands for: fixed per (category, label, value)."""
    return spec.benefits[zlib.crc32(f"{spec.key}|{label}={value}".encode()) % len(spec.benefits)]


def _attribute_phrase(label: str, value: str) -> str:
    return f"{value} {label}"


def _choice(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _two_distinct(rng: np.random.Generator, options) -> tuple[str, str]:
    first, second = rng.choice(len(options), size=2, replace=False)
    return options[first], options[second]


def _synonym_fields(voice: Voice, rng: np.random.Generator) -> dict[str, str]:
    return {name: _choice(rng, words) for name, words in voice.synonyms.items()}


def _item_fields(item: Item, spec: CategorySpec, voice: Voice, rng: np.random.Generator) -> dict[str, str]:
    order = rng.permutation(len(item.attributes))
    attributes = [item.attributes[i] for i in order]
    use, use2 = _two_distinct(rng, spec.uses)
    fields = {
        "title": item.title,
        "brand": item.brand,
        "noun": _choice(rng, spec.nouns),
        "category": spec.display,
        "audience": item.audience,
        "benefit": _choice(rng, spec.benefits),
        "use": use,
        "use2": use2,
        "band": item.price_band,
        "price_word": _choice(rng, PRICE_WORDS[item.price_band]),
        "value_phrase": _choice(rng, VALUE_PHRASES[item.price_band]),
        "cta": spec.cta,
        "label1": attributes[0][0],
        "val1": attributes[0][1],
    }
    for n in range(3):
        label, value = attributes[n % len(attributes)]
        fields[f"attr{n + 1}"] = _attribute_phrase(label, value)
        fields[f"ab{n + 1}"] = attribute_benefit(spec, label, value)
    fields.update(_synonym_fields(voice, rng))
    return fields


def _summary_fields(profile: HistoryProfile, voice: Voice, rng: np.random.Generator) -> dict[str, str]:
    top = category_by_key(profile.top_category)
    return {
        "person": _choice(rng, voice.patterns["person"]),
        "top_cat": top.display,
        "k": str(profile.top_category_clicks),
        "n": str(profile.num_clicks),
        "top_brand": profile.top_brand,
        "brand_k": str(profile.top_brand_clicks),
        "band": profile.top_band,
        "price_word": _choice(rng, PRICE_WORDS[profile.top_band]),
        "cat2": category_by_key(profile.second_category).display if profile.second_category else "",
        "benefit": _choice(rng, top.benefits),
        "use": _choice(rng, top.uses),
        "newest": profile.newest_title,
        **_synonym_fields(voice, rng),
    }


def _rec_fields(picks: tuple[RankedPick, ...], voice: Voice, rng: np.random.Generator) -> dict[str, str]:
    first = picks[0].item
    spec = category_by_key(first.category_key)
    fields = {f"t{n + 1}": pick.item.title for n, pick in enumerate(picks[:3])}
    fields.update(_item_fields(first, spec, voice, rng))
    fields["brand_k"] = str(picks[0].brand_clicks)
    reason = _pick(voice, f"reason_{picks[0].reason}", rng)
    fields["reason"] = reason.format(**fields)
    return fields


# ---- rendering -----------------------------------------------------------------------------


def _arrange(middle: dict[str, list[str]], voice: Voice, rng: np.random.Generator) -> list[str]:
    """The middle sentences, slot by slot: in the voice's usual slot order, or a random one."""
    slots = [slot for slot in voice.slot_order if slot in middle]
    if rng.random() >= _USUAL_ORDER_SHARE:
        slots = [slots[i] for i in rng.permutation(len(slots))]
    return [sentence for slot in slots for sentence in middle[slot]]


def _pick(voice: Voice, slot: str, rng: np.random.Generator, avoid: list[str] | None = None) -> str:
    options = [p for p in voice.patterns[slot] if not avoid or p not in avoid] or list(voice.patterns[slot])
    return _choice(rng, options)


_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _render(sentences: list[str], fields: dict[str, str]) -> str:
    """Fills each pattern, fixes a/an, capitalises sentence starts, joins with spaces."""
    rendered = []
    for pattern in sentences:
        sentence = _ARTICLE.sub(r"\1n ", pattern.format(**fields))
        rendered.append(sentence[:1].upper() + sentence[1:])
    return " ".join(rendered)
