"""A generator of varied product reviews with sentiment and star labels (offline demo data).

The star rating (1-5, uniform) is drawn first and the text follows from it: product
categories, aspects, opinion words of graded strength, openers, closers and "X but Y" mixes, so
no two runs memorise a handful of fixed sentences. 5 stars is strong praise only; 4 mild praise
with at most a mild complaint; 3 as much good as bad; 2 and 1 mirror 4 and 5. The sentiment is
positive for 4-5 stars, negative for 1-2 and neutral for 3.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

PRODUCTS = {
    "headphones": ["sound quality", "battery life", "noise cancelling", "ear cushions", "bluetooth connection"],
    "coffee maker": ["brew speed", "taste of the coffee", "carafe", "water tank", "cleaning"],
    "running shoes": ["cushioning", "grip", "fit", "durability", "breathability"],
    "laptop": ["screen", "keyboard", "battery life", "fan noise", "build quality"],
    "blender": ["motor", "blades", "jar", "noise level", "ease of cleaning"],
    "backpack": ["zippers", "straps", "pockets", "stitching", "water resistance"],
    "smartwatch": ["display", "heart rate sensor", "battery life", "strap", "app"],
    "desk lamp": ["brightness", "dimmer", "base", "color temperature", "switch"],
    "vacuum cleaner": ["suction", "battery life", "dust bin", "filter", "attachments"],
    "phone case": ["grip", "drop protection", "button feel", "fit", "finish"],
    "air fryer": ["crispiness", "basket", "timer", "preheat time", "cleaning"],
    "office chair": ["lumbar support", "armrests", "wheels", "seat cushion", "assembly"],
    "tent": ["poles", "rain fly", "zippers", "floor", "setup time"],
    "electric kettle": ["boil time", "lid", "handle", "auto shut-off", "taste of the water"],
    "yoga mat": ["grip", "thickness", "smell", "durability", "carry strap"],
    "board game": ["rules", "artwork", "components", "replay value", "box insert"],
    "mechanical keyboard": ["switches", "keycaps", "backlight", "software", "stabilizers"],
    "water bottle": ["lid", "insulation", "seal", "size", "finish"],
    "e-reader": ["screen", "page turn speed", "battery life", "front light", "store"],
    "frying pan": ["non-stick coating", "handle", "heat distribution", "weight", "lid"],
    "wireless router": ["range", "setup", "speed", "app", "stability"],
    "sunglasses": ["lenses", "frame", "hinges", "fit", "case"],
    "cordless drill": ["torque", "battery", "chuck", "weight", "charger"],
    "children's book": ["illustrations", "story", "binding", "paper", "length"],
}

# Opinion words graded by strength: the star rating is carried by how strong the praise or the
# complaints are and by how they mix, which a model can learn from the text and a reader can
# check, while a model that only sees "good" vs "bad" cannot tell 4 from 5 or 1 from 2.
STRONG_POS = ["excellent", "fantastic", "superb", "outstanding", "flawless", "top-notch",
              "phenomenal", "brilliant"]
MILD_POS = ["good", "solid", "nice", "pleasant", "reliable", "decent", "well made", "sturdy"]
MILD_NEG = ["mediocre", "underwhelming", "a bit flimsy", "below average", "inconsistent",
            "not great", "somewhat clunky", "weaker than expected"]
STRONG_NEG = ["terrible", "awful", "useless", "atrocious", "horrible", "pathetic", "garbage",
              "dreadful"]
SMALL_ISSUE = ["my only small gripe is that the {a} is {adj}",
               "the {a} is {adj}, but that is a minor thing",
               "the {a} could be better, though it hardly matters"]
SMALL_PLUS = ["the {a} is {adj}, but that does not make up for it",
              "I'll admit the {a} is {adj}, yet that hardly helps",
              "the {a} is fine, which is about the only good thing"]
POS_ASPECT = ["the {a} is {adj}", "the {a} has been {adj} so far", "honestly the {a} is {adj}",
              "the {a} feels {adj}", "the {a} turned out {adj}"]
NEG_ASPECT = ["the {a} is {adj}", "the {a} has been {adj} from day one", "sadly the {a} is {adj}",
              "the {a} feels {adj}", "the {a} turned out {adj}"]
OPENERS = {
    5: ["Absolutely love this {p}!", "Best {p} I have ever owned.", "This {p} blew me away:",
        "I bought this {p} last month and", "After two weeks with this {p},"],
    4: ["Pretty happy with this {p}.", "Good {p} overall.", "I bought this {p} last month and",
        "After two weeks with this {p},", "This {p} does what I wanted:"],
    3: ["Mixed feelings about this {p}.", "This {p} is okay.", "I bought this {p} last month and",
        "After two weeks with this {p},", "Not sure what to think of this {p}:"],
    2: ["Somewhat disappointed with this {p}.", "Not a great {p}.",
        "I bought this {p} last month and", "After two weeks with this {p},",
        "I expected more from this {p}:"],
    1: ["Worst {p} I have ever owned.", "Stay away from this {p}!", "This {p} is a disaster:",
        "I bought this {p} last month and", "After two weeks with this {p},"],
}
CLOSERS = {
    5: ["Would buy again in a heartbeat.", "Worth every penny.", "Highly recommend it.",
        "I already ordered a second one.", ""],
    4: ["Happy with it overall.", "I would recommend it.", "Good value for the money.",
        "Minor issues aside, I'm keeping it.", ""],
    3: ["It does the job, nothing more.", "Average overall.", "Might keep it, might not.",
        "Fine for the price, I guess.", ""],
    2: ["Probably returning it.", "I would not buy it again.", "Not worth the money.",
        "Hoping the next version is better.", ""],
    1: ["Returning it immediately.", "A complete waste of money.", "Do not buy this.",
        "Asking for a refund.", ""],
}


@dataclass
class Review:
    text: str
    sentiment: str      # "positive" (4-5 stars) | "neutral" (3) | "negative" (1-2)
    stars: int          # 1..5
    product: str


def _sentence(s: str) -> str:
    s = s.strip()
    return s[0].upper() + s[1:] if s else s


def _clause(rng: random.Random, aspect: str, positive: bool, strong: bool) -> str:
    words = (STRONG_POS if strong else MILD_POS) if positive else (STRONG_NEG if strong else MILD_NEG)
    return rng.choice(POS_ASPECT if positive else NEG_ASPECT).format(a=aspect, adj=rng.choice(words))


def _body(rng: random.Random, stars: int, aspects: list[str]) -> list[str]:
    """The opinion clauses of a review with this many stars."""
    if stars == 5:   # strong praise only
        return [_clause(rng, a, True, True) for a in aspects[:rng.randint(1, 2)]]
    if stars == 1:   # strong complaints only
        return [_clause(rng, a, False, True) for a in aspects[:rng.randint(1, 2)]]
    if stars == 4:   # praise, with at most a small reservation
        out = [_clause(rng, aspects[0], True, rng.random() < 0.3)]
        if rng.random() < 0.7:
            out.append(rng.choice(SMALL_ISSUE).format(a=aspects[1], adj=rng.choice(MILD_NEG)))
        return out
    if stars == 2:   # complaints, with at most a small consolation
        out = [_clause(rng, aspects[0], False, rng.random() < 0.3)]
        if rng.random() < 0.7:
            out.append(rng.choice(SMALL_PLUS).format(a=aspects[1], adj=rng.choice(MILD_POS)))
        return out
    clauses = [_clause(rng, aspects[0], True, False), _clause(rng, aspects[1], False, False)]
    rng.shuffle(clauses)   # 3 stars: as much good as bad
    return clauses


def make_review(rng: random.Random) -> Review:
    product = rng.choice(list(PRODUCTS))
    aspects = rng.sample(PRODUCTS[product], k=2)
    stars = rng.randint(1, 5)
    clauses = _body(rng, stars, aspects)
    joiner = " but " if stars == 3 else "; " if stars in (2, 4) else " and "
    if rng.random() < 0.5:
        body = joiner.join(clauses)
    else:
        body = ". ".join([clauses[0]] + [_sentence(c) for c in clauses[1:]])
    start = rng.choice(OPENERS[stars]).format(p=product)
    if start.endswith((".", "!", ":")):
        body = _sentence(body) if not start.endswith(":") else body
    text = " ".join(p for p in (start + " " + body + ".", rng.choice(CLOSERS[stars])) if p)
    text = text.replace("!.", "!").replace("..", ".")
    sentiment = "positive" if stars >= 4 else "negative" if stars <= 2 else "neutral"
    return Review(text=_sentence(text), sentiment=sentiment, stars=stars, product=product)


def generate_reviews(n: int, seed: int = 0) -> list[Review]:
    """n reviews, deterministic for a seed, with no duplicate texts."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Review] = []
    while len(out) < n:
        r = make_review(rng)
        if r.text not in seen:
            seen.add(r.text)
            out.append(r)
    return out


# Rating explanations, as a second annotator writes them: the right number, then a sentence.
# For preference data (prefer the bare number) and for training data whose answer format is
# inconsistent (some annotators explain their rating).
_VERDICT = {5: ["nothing but strong praise", "enthusiastic about every part of it",
                "no complaints at all, only strong praise"],
            4: ["mostly happy, with at most a minor complaint", "positive with a small reservation",
                "clearly satisfied, apart from a small gripe"],
            3: ["as much good as bad", "mixed: one thing good, one thing bad",
                "neither happy nor unhappy overall"],
            2: ["mostly unhappy, with a small consolation", "disappointed, though not entirely",
                "negative, with one minor positive"],
            1: ["nothing but strong complaints", "angry about every part of it",
                "completely negative, with no redeeming point"]}
_EXPLAIN = ["{n} stars. The reviewer is {v}.", "I would say {n}: the author is {v}.",
            "{n} - the review is {v}, which points to {n} out of 5.",
            "The rating is {n} stars, because the author is {v}.",
            "{n}. The text is {v}, so {n} stars fits best."]


def explain_rating(stars: int, rng: random.Random) -> str:
    """An answer that gives the rating and explains it, in one of several phrasings."""
    return rng.choice(_EXPLAIN).format(n=stars, v=rng.choice(_VERDICT[stars]))
