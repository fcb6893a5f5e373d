"""A generator of varied product reviews with sentiment and star labels (offline demo data).

Reviews are composed from product categories, aspects, opinion phrases of graded strength,
openers, closers, hedges and mixed "X but Y" sentences, so no two runs memorise a handful of
fixed sentences. The label follows the overall verdict, including mixed reviews whose minor
complaint or praise points the other way.
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

POS_ADJ = ["excellent", "fantastic", "great", "superb", "solid", "impressive", "outstanding",
           "reliable", "wonderful", "top-notch", "really good", "better than expected"]
NEG_ADJ = ["terrible", "awful", "disappointing", "flimsy", "useless", "poor", "mediocre",
           "frustrating", "cheap-feeling", "worse than expected", "really bad", "unreliable"]
POS_ASPECT = ["the {a} is {adj}", "I love the {a}", "the {a} works perfectly",
              "the {a} exceeded my expectations", "the {a} is {adj}, no complaints at all",
              "honestly the {a} is {adj}", "the {a} has been {adj} so far"]
NEG_ASPECT = ["the {a} is {adj}", "I hate the {a}", "the {a} stopped working after a week",
              "the {a} is {adj} and it shows", "the {a} broke almost immediately",
              "the {a} is a real letdown", "the {a} has been {adj} from day one"]
POS_OPEN = ["I bought this {p} last month and", "After two weeks with this {p},",
            "Got this {p} as a gift and", "This {p} is a keeper:", "Five stars for this {p}!",
            "Best {p} I have owned.", "I was skeptical about this {p}, but",
            "We use this {p} every day and"]
NEG_OPEN = ["I bought this {p} last month and", "After two weeks with this {p},",
            "Got this {p} as a gift and", "Save your money on this {p}:",
            "One star for this {p}.", "Worst {p} I have owned.",
            "I had high hopes for this {p}, but", "We tried this {p} for a week and"]
POS_CLOSE = ["Would buy again.", "Highly recommend it.", "Worth every penny.",
             "I already ordered a second one.", "Very happy with it.", "No regrets.",
             "Totally worth it.", ""]
NEG_CLOSE = ["I am returning it.", "Do not buy this.", "A complete waste of money.",
             "I regret this purchase.", "Very disappointed.", "Asking for a refund.",
             "Avoid.", ""]
HEDGE_POS = ["The only small issue is that the {a} is a bit {adj}, but overall I'm happy.",
             "Sure, the {a} could be better, but everything else makes up for it."]
HEDGE_NEG = ["The {a} is fine, but that does not save it.",
             "I'll admit the {a} is decent, yet overall it's a disappointment."]


@dataclass
class Review:
    text: str
    sentiment: str      # "positive" | "negative"
    stars: int          # 1..5
    product: str


def _sentence(s: str) -> str:
    s = s.strip()
    return s[0].upper() + s[1:] if s else s


def make_review(rng: random.Random) -> Review:
    product = rng.choice(list(PRODUCTS))
    aspects = rng.sample(PRODUCTS[product], k=3)
    positive = rng.random() < 0.5
    adj, aspect_tpl, opener, closer, hedge, other_adj = (
        (POS_ADJ, POS_ASPECT, POS_OPEN, POS_CLOSE, HEDGE_POS, NEG_ADJ) if positive else
        (NEG_ADJ, NEG_ASPECT, NEG_OPEN, NEG_CLOSE, HEDGE_NEG, POS_ADJ))
    n_aspects = rng.randint(1, 2)
    clauses = [t.format(a=aspects[i], adj=rng.choice(adj))
               for i, t in enumerate(rng.sample(aspect_tpl, k=n_aspects))]
    if rng.random() < 0.5:
        body = " and ".join(clauses)
    else:
        body = ". ".join([clauses[0]] + [_sentence(c) for c in clauses[1:]])
    start = rng.choice(opener).format(p=product)
    if start.endswith((".", "!")):
        body = _sentence(body)
    parts = [start + " " + body + "."]
    mixed = rng.random() < 0.3
    if mixed:  # a complaint in a positive review (or praise in a negative one)
        parts.append(rng.choice(hedge).format(a=aspects[2], adj=rng.choice(other_adj)))
    parts.append(rng.choice(closer))
    text = " ".join(p for p in parts if p)
    text = text.replace("!.", "!").replace("..", ".")
    if positive:
        stars = 4 if mixed or n_aspects == 1 and rng.random() < 0.4 else 5
    else:
        stars = 2 if mixed or n_aspects == 1 and rng.random() < 0.4 else 1
    return Review(text=_sentence(text), sentiment="positive" if positive else "negative",
                  stars=stars, product=product)


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
