"""Write small synthetic datasets in the exact layouts the Hugging Face Hub serves.

    python scripts/make_sample_data.py --out data/sample [--seed 0]

Three folders, one per built-in preset, so demos and tests run offline:

- ``banking77/{train,test}.parquet``: ``text`` + ``label`` (ClassLabel over 10 real intent names).
- ``commonsense_qa/{train,validation,test}.parquet``: ``id``, ``question``, ``question_concept``,
  ``choices`` {label, text}, ``answerKey`` (empty in test, as on the hub).
- ``text_claims/train.csv``: ``idx,Text,Label`` with labels ``Claim`` / ``Not a Claim``.
- ``ultrafeedback/{train_prefs,test_prefs}.parquet``: preference pairs in the layout of
  ``HuggingFaceH4/ultrafeedback_binarized`` (``prompt``, ``prompt_id``, ``chosen`` and
  ``rejected`` as user + assistant message lists, ``score_chosen``, ``score_rejected``): a banking
  customer message, a reply naming the right topic (chosen) and one naming a wrong topic or
  refusing (rejected), for DPO.

Every sentence comes from the templates below; nothing is copied from the real datasets. The
signal is deliberately simple (a keyword per intent, one answer category per question), so the
built-in tiny model can learn each task in a couple of CPU minutes, while slot fillers (names,
amounts, openers) keep rows varied and unique. The same seed always gives the same rows.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import datasets

BANKING_TRAIN_PER_INTENT = 100
BANKING_TEST_PER_INTENT = 25
CSQA_SPLIT_SIZES = {"train": 900, "validation": 200, "test": 100}
CLAIMS_PER_LABEL = 250
PREFERENCE_SPLIT_SIZES = {"train_prefs": 300, "test_prefs": 60}
CLAIM, NOT_A_CLAIM = "Claim", "Not a Claim"
CHOICE_LETTERS = ["A", "B", "C", "D", "E"]

# ---------------------------------------------------------------------------------------------
# Shared slot fillers
# ---------------------------------------------------------------------------------------------

NAMES = [
    "Alex", "Maria", "Sam", "Priya", "Tom", "Lena", "Omar", "Grace", "Diego", "Hana", "Ben",
    "Chloe", "Ivan", "Nadia", "Leo", "Sofia", "Raj", "Emma", "Kofi", "Mia", "Jonas", "Aisha",
    "Pablo", "Yuki", "Ethan", "Zara", "Luca", "Nora", "Felix", "Amara",
]  # fmt: skip
AMOUNTS = [
    "£5", "£12", "£20", "£25", "£40", "£50", "£75", "£100", "£150", "£200", "€10", "€30",
    "€60", "€120", "$15", "$45", "$80", "$250",
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WAITS = ["two days", "three days", "four days", "a week", "over a week", "ten days", "five days"]
MERCHANTS = [
    "a supermarket", "an online shop", "a petrol station", "a coffee shop", "a hotel",
    "a pharmacy", "a bookshop", "a restaurant", "an electronics store", "a taxi company",
]  # fmt: skip
CURRENCIES = [
    "euros", "dollars", "pounds", "yen", "Swiss francs", "Canadian dollars", "Polish zloty",
    "Australian dollars",
]  # fmt: skip
COUNTRIES = ["Spain", "Japan", "Canada", "Italy", "Mexico", "Poland", "Greece", "Thailand"]
CITIES = [
    "Leeds", "Bristol", "Glasgow", "Cardiff", "Dublin", "Manchester", "York", "Brighton",
    "Oxford", "Belfast",
]  # fmt: skip
OPENERS = ["", "", "", "Hi.", "Hello!", "Hey there.", "Good morning.", "Quick question.", "Help!"]
CLOSERS = ["", "", "", "Thanks.", "Thank you!", "Can you help?", "Please advise.", "Cheers."]

# ---------------------------------------------------------------------------------------------
# banking77: one keyword family per intent; pairs with shared words (card_arrival/card_linking,
# pending_top_up/top_up_failed) are told apart by a second keyword, as in the real data.
# ---------------------------------------------------------------------------------------------

BANKING_TEMPLATES: dict[str, list[str]] = {
    "activate_my_card": [
        "How do I activate the new card that came in the post on {day}?",
        "I have my new card but can't work out how to activate it in the app.",
        "I need to activate my card before my trip to {country}, what are the steps?",
        "The activation code for my card is not working, how else can I activate it?",
        "Where in the app is the option to activate a card?",
        "I'm trying to activate my card but it keeps saying try again later.",
        "Do I have to activate my card before I can spend money with it?",
        "Can you walk me through activating the card I just received?",
    ],
    "card_arrival": [
        "My card still hasn't arrived and it has been {wait} since I ordered it.",
        "When will my new card arrive? I ordered it {wait} ago.",
        "How long does a new card usually take to arrive?",
        "I'm still waiting for my card to arrive in the post, is it on the way?",
        "Can you tell me when the card I ordered last {day} will arrive?",
        "The card you sent me never arrived, what should I do?",
        "Is there any way to check when my card will arrive?",
        "It has been {wait} and my card still hasn't arrived in the mail.",
    ],
    "card_linking": [
        "How do I link the card I already have to the app?",
        "I want to link my existing card to my account, where do I start?",
        "The app won't let me link my card, it says the details are wrong.",
        "Can I link a second card to the same account for {name}?",
        "I found my old card again, how can I link it back to my profile?",
        "Linking my card to the app keeps giving an error, what am I doing wrong?",
        "Where do I enter the card number to link it in the app?",
        "Is it possible to link a card I got from a friend's account?",
    ],
    "card_payment_fee_charged": [
        "Why was I charged an extra fee for a card payment at {merchant}?",
        "There is a fee of {amount} on my card payment that I didn't expect.",
        "I paid by card at {merchant} and got charged a fee, why is that?",
        "What is this fee on my statement after a normal card payment?",
        "You charged me a fee for paying with my card, I thought card payments were free.",
        "Can you remove the {amount} fee you added to my card payment last {day}?",
        "Why do card payments abroad come with an extra fee?",
        "A fee appeared next to my card payment to {merchant}, please explain it.",
    ],
    "exchange_rate": [
        "What exchange rate do you use when I pay in {currency}?",
        "The exchange rate I got for {currency} looks worse than the market rate.",
        "How is the exchange rate calculated when I spend money in {country}?",
        "Where can I see today's exchange rate for {currency}?",
        "Is the exchange rate better if I convert to {currency} in the app first?",
        "Why did the exchange rate change between my payment and the final charge?",
        "Do you add anything on top of the exchange rate for {currency}?",
        "I'm going to {country} next week, what exchange rate will I get there?",
    ],
    "lost_or_stolen_card": [
        "I think my card was stolen at {merchant}, please block it now.",
        "I lost my card somewhere in {city} yesterday, what should I do?",
        "My wallet was stolen with my card inside, can you freeze it?",
        "Help, I can't find my card anywhere and I think it's lost.",
        "Someone stole my bag and my card was in it, please cancel the card.",
        "What do I do if my card is lost while I'm travelling in {country}?",
        "I lost my card on {day}, can I get a replacement sent out?",
        "My card has been stolen and I'm worried someone will use it.",
    ],
    "pending_top_up": [
        "My top up of {amount} has been pending since {day}, is that normal?",
        "Why is my top up still showing as pending in the app?",
        "I topped up {amount} but it's stuck on pending, when will it go through?",
        "How long does a pending top up usually take to clear?",
        "The top up I made this morning is still pending, can you check it?",
        "Is there a reason my top up is pending for so long?",
        "My balance hasn't changed because the top up is pending, what's going on?",
        "A top up from my bank has stayed pending for {wait}.",
    ],
    "Refund_not_showing_up": [
        "{merchant_cap} says they refunded me {amount} but the refund isn't showing up.",
        "I'm still waiting for a refund that should have appeared {wait} ago.",
        "Why doesn't my refund show up in my account yet?",
        "The shop confirmed my refund on {day} but I can't see it anywhere.",
        "Where is my refund? The seller says it was sent {wait} ago.",
        "My refund of {amount} from {merchant} is missing from my statement.",
        "How long before a refund shows up in the app?",
        "I returned an item and the refund never showed up in my account.",
    ],
    "top_up_failed": [
        "My top up failed and I don't know why, can you help?",
        "I tried to top up {amount} but it failed twice.",
        "Why did my top up fail when my card has enough money?",
        "The app says my top up failed, what went wrong?",
        "Every time I try to top up it fails with an error.",
        "My top up of {amount} failed on {day}, was I still charged?",
        "I can't top up, the payment keeps failing at the last step.",
        "What should I do if a top up fails but the money left my bank?",
    ],
    "transfer_not_received_by_recipient": [
        "I sent {amount} to {name} but they say the transfer never reached them.",
        "My transfer to {name} shows as complete, but they haven't received it.",
        "The person I paid hasn't received my transfer from {day}.",
        "Why hasn't my friend received the money I transferred {wait} ago?",
        "{name} is still waiting for my transfer of {amount}, where is it?",
        "I made a transfer to my landlord and he says the money isn't there.",
        "The recipient didn't receive the transfer I sent last {day}.",
        "How long until {name} receives the transfer I made today?",
    ],
}
BANKING_LABEL_NAMES = sorted(BANKING_TEMPLATES, key=str.lower)  # the hub orders ids this way

# ---------------------------------------------------------------------------------------------
# commonsense_qa: each question asks for one category of thing (a place, an animal, a tool...),
# and exactly one choice belongs to that category; the four distractors come from others.
# Each category: question templates over {x} (and {name}), and (concept, x, answer) triples.
# ---------------------------------------------------------------------------------------------

CSQA_CATEGORIES: dict[str, dict[str, list]] = {
    "place": {
        "templates": [
            "Where would you most likely find {x}?",
            "{name} wanted to find {x}. Where should {name} look?",
            "Where is a common place to see {x}?",
            "Where would {name} go to find {x}?",
        ],
        "items": [
            ("milk", "cold milk and leftovers", "refrigerator"),
            ("book", "shelves of books to borrow", "library"),
            ("painting", "old paintings and statues", "museum"),
            ("nurse", "doctors and nurses at work", "hospital"),
            ("bread", "bread baked early in the morning", "bakery"),
            ("plane", "planes waiting to take off", "airport"),
            ("chalkboard", "students sitting near a chalkboard", "classroom"),
            ("sand", "sand, waves and seashells", "beach"),
        ],
    },
    "animal": {
        "templates": [
            "Which animal is known for {x}?",
            "{name} saw an animal {x}. Which animal was it?",
            "What kind of animal is usually {x}?",
            "On a walk, {name} spotted an animal {x}. What animal was it?",
        ],
        "items": [
            ("bark", "barking at the mail carrier", "dog"),
            ("purr", "purring on a warm lap", "cat"),
            ("web", "spinning a web in the corner", "spider"),
            ("tree", "swinging from tree to tree", "monkey"),
            ("pouch", "hopping with a baby in its pouch", "kangaroo"),
            ("trunk", "spraying water with its trunk", "elephant"),
            ("flower", "buzzing around flowers for nectar", "bee"),
            ("pond", "croaking loudly beside a pond", "frog"),
        ],
    },
    "tool": {
        "templates": [
            "What tool would you use to {x}?",
            "{name} needs to {x}. What tool should {name} grab?",
            "Which tool is best if you want to {x}?",
            "{name} asked for a tool to {x}. Which one did {name} need?",
        ],
        "items": [
            ("paper", "cut a sheet of paper", "scissors"),
            ("nail", "drive a nail into wood", "hammer"),
            ("bolt", "tighten a loose bolt", "wrench"),
            ("hole", "dig a hole in the garden", "shovel"),
            ("length", "measure the length of a table", "ruler"),
            ("dust", "sweep dust off the floor", "broom"),
            ("screw", "turn a tiny screw", "screwdriver"),
            ("firewood", "chop firewood", "axe"),
        ],
    },
    "feeling": {
        "templates": [
            "How would someone probably feel after {x}?",
            "After {x}, how did {name} most likely feel?",
            "What feeling do people usually have after {x}?",
            "What would {name} feel right after {x}?",
        ],
        "items": [
            ("prize", "winning a big prize", "happy"),
            ("toy", "losing a favorite toy", "sad"),
            ("noise", "hearing a strange noise at night", "scared"),
            ("traffic", "being cut off in traffic", "angry"),
            ("waiting", "waiting for hours with nothing to do", "bored"),
            ("race", "running a very long race", "tired"),
            ("praise", "being praised in front of the class", "proud"),
            ("friend", "finding an old friend at the door", "surprised"),
        ],
    },
    "body": {
        "templates": [
            "Which part of the body do you use to {x}?",
            "{name} wants to {x}. Which body part will {name} use?",
            "What body part helps people {x}?",
            "To {x}, which part of your body do you need?",
        ],
        "items": [
            ("smell", "smell fresh flowers", "nose"),
            ("music", "listen to music", "ears"),
            ("chew", "chew hard food", "teeth"),
            ("sign", "read a street sign", "eyes"),
            ("ball", "kick a ball", "foot"),
            ("pencil", "hold a pencil", "hand"),
            ("taste", "taste something salty", "tongue"),
            ("breath", "take a deep breath", "lungs"),
        ],
    },
    "clothing": {
        "templates": [
            "What would you wear to {x}?",
            "{name} wants to {x}. What should {name} put on?",
            "Which piece of clothing helps you {x}?",
            "Before heading out, {name} needed something to wear to {x}. What was it?",
        ],
        "items": [
            ("winter", "keep hands warm in winter", "gloves"),
            ("rain", "stay dry in the rain", "raincoat"),
            ("sun", "block the glare of the bright sun", "sunglasses"),
            ("swimming", "go swimming at the pool", "swimsuit"),
            ("pants", "hold up loose pants", "belt"),
            ("trail", "walk on muddy rocky trails", "boots"),
            ("sleep", "sleep comfortably at night", "pajamas"),
            ("neck", "keep the neck warm", "scarf"),
        ],
    },
    "vehicle": {
        "templates": [
            "What vehicle would you use to {x}?",
            "{name} has to {x}. Which vehicle should {name} take?",
            "Which kind of vehicle is best to {x}?",
            "What would {name} ride to {x}?",
        ],
        "items": [
            ("ocean", "carry cargo across the ocean", "ship"),
            ("country", "fly to another country", "airplane"),
            ("pedal", "pedal along a bike path", "bicycle"),
            ("city", "travel under a busy city", "subway"),
            ("load", "move heavy loads on the highway", "truck"),
            ("rails", "travel between cities on rails", "train"),
            ("lake", "paddle quietly across a lake", "canoe"),
            ("moon", "travel to the moon", "rocket"),
        ],
    },
    "instrument": {
        "templates": [
            "Which musical instrument {x}?",
            "{name} is learning an instrument that {x}. What is it?",
            "What instrument {x}?",
            "In the band, {name} plays the instrument that {x}. Which one?",
        ],
        "items": [
            ("keys", "has black and white keys", "piano"),
            ("strings", "has six strings you strum", "guitar"),
            ("sticks", "is hit with two sticks", "drum"),
            ("bow", "is played with a bow under the chin", "violin"),
            ("tube", "is a thin tube you blow across", "flute"),
            ("brass", "is made of brass and very loud", "trumpet"),
            ("reed", "is a curved brass horn with a reed", "saxophone"),
            ("frame", "is a tall frame of strings you pluck", "harp"),
        ],
    },
    "job": {
        "templates": [
            "Who would you call to {x}?",
            "{name} needs someone to {x}. Who should {name} ask?",
            "Whose job is it to {x}?",
            "Which worker did {name} hire to {x}?",
        ],
        "items": [
            ("pipe", "fix a leaking pipe", "plumber"),
            ("fire", "put out a house fire", "firefighter"),
            ("tooth", "treat a painful tooth", "dentist"),
            ("engine", "repair a broken car engine", "mechanic"),
            ("hair", "cut and style hair", "barber"),
            ("jet", "fly a passenger jet", "pilot"),
            ("puppy", "treat a sick puppy", "veterinarian"),
            ("wiring", "repair the wiring in a house", "electrician"),
        ],
    },
    "food": {
        "templates": [
            "Which food {x}?",
            "{name} ate a food that {x}. What was it?",
            "What do people eat that {x}?",
            "At lunch, {name} chose a food that {x}. Which food?",
        ],
        "items": [
            ("peel", "is yellow and peeled before eating", "banana"),
            ("golden", "is sweet, golden and sticky", "honey"),
            ("slice", "is round, cheesy and cut into slices", "pizza"),
            ("grain", "is a small grain boiled in water", "rice"),
            ("cone", "is frozen and served in a cone", "ice cream"),
            ("potato", "is mashed or fried potato", "fries"),
            ("breakfast", "is crunchy and eaten from a bowl at breakfast", "cereal"),
            ("spoon", "is a warm liquid eaten with a spoon", "soup"),
        ],
    },
}

# ---------------------------------------------------------------------------------------------
# TextClaimsDataset: a claim reports damage, loss, theft or an accident and asks for money back;
# everything else (premiums, policy changes, addresses, opening hours) is not a claim.
# ---------------------------------------------------------------------------------------------

CLAIM_TEMPLATES = [
    "My car was hit in a car park on {day} and the bumper is badly damaged. I want to file a claim.",
    "A pipe burst in my kitchen and flooded the floor. Please reimburse the {amount} repair bill.",
    "My laptop was stolen from my flat last {day}. How do I claim for it?",
    "I had an accident in {city}; the other driver ran a red light. I need to claim the repairs.",
    "Hail damaged my roof during the storm on {day}. I'd like to submit a claim for {amount}.",
    "Someone broke into my house and stole jewellery worth {amount}. Please start my claim.",
    "My phone was damaged when I dropped it on holiday in {country}. Can I get reimbursed?",
    "A tree fell on my garage in last night's storm. I am filing a claim for the damage.",
    "My luggage was lost on a flight to {country}. I want reimbursement for {amount} of clothes.",
    "I was rear-ended on the motorway on {day}. Please process a claim for my damaged car.",
    "Water from the flat upstairs damaged my ceiling. I need to claim the repair costs.",
    "My bike was stolen outside the station in {city}. I'd like to make a claim.",
    "A kitchen fire damaged my cupboards and oven. Please reimburse the {amount} I paid to fix it.",
    "I slipped and broke my wrist and paid {amount} in medical bills. I want to claim this back.",
    "My {item} was stolen from my car in {city}. Please reimburse me for it.",
    "The storm on {day} damaged my fence and shed. How do I claim for the repairs?",
    "My {item} was damaged in a house fire. I want to claim the {amount} it cost.",
    "A delivery van scraped my parked car and drove off. I'd like to file a claim.",
    "Burglars damaged my front door and stole my {item}. Please open a claim for me.",
    "My suitcase was stolen at the airport in {country}. Can I claim for the lost items?",
]
NOT_A_CLAIM_TEMPLATES = [
    "I moved to {city} last {day}. Please update the address on my policy.",
    "Why has my monthly premium gone up to {amount}?",
    "Can I add my partner {name} as a named driver on my car policy?",
    "What are your office opening hours on {day}?",
    "How do I pay my premium by direct debit instead of card?",
    "Is there a discount if I buy home and car insurance together?",
    "Please send me a copy of my policy documents by email.",
    "When does my current policy renew, and will the price change?",
    "Can I change my payment date to the {nth} of each month?",
    "I would like a quote for travel insurance for a trip to {country}.",
    "How do I update the phone number on my account?",
    "Does my policy include breakdown cover, or is that extra?",
    "Could you explain the difference between your basic and premium plans?",
    "My name changed after my wedding to {name}. How do I update my policy?",
    "Can I pay my premium yearly instead of monthly to save money?",
    "What documents do I need to open a new home insurance policy?",
    "Is my {item} included under my contents policy, or do I list it separately?",
    "How do I cancel my policy when I sell my car next {day}?",
    "Do you offer student discounts on contents insurance in {city}?",
    "Please send the renewal letter for my policy to my new email address.",
]
NTHS = ["1st", "5th", "10th", "15th", "20th", "25th", "28th"]
ITEMS = ["laptop", "bicycle", "phone", "camera", "watch", "tablet", "guitar", "handbag"]


def _fill(template: str, rng: random.Random) -> str:
    merchant = rng.choice(MERCHANTS)
    return template.format(
        name=rng.choice(NAMES),
        amount=rng.choice(AMOUNTS),
        day=rng.choice(DAYS),
        wait=rng.choice(WAITS),
        merchant=merchant,
        merchant_cap=merchant[0].upper() + merchant[1:],
        currency=rng.choice(CURRENCIES),
        country=rng.choice(COUNTRIES),
        city=rng.choice(CITIES),
        nth=rng.choice(NTHS),
        item=rng.choice(ITEMS),
    )


def _wrap(body: str, rng: random.Random) -> str:
    """Add an optional greeting and sign-off, as real customer messages have."""
    return " ".join(part for part in (rng.choice(OPENERS), body, rng.choice(CLOSERS)) if part)


def _unique_texts(
    templates: list[str], count: int, rng: random.Random, seen: set[str]
) -> list[str]:
    """Draw ``count`` texts never drawn before (``seen`` is shared across intents and splits)."""
    texts: list[str] = []
    for _ in range(count * 200):
        if len(texts) == count:
            return texts
        text = _wrap(_fill(rng.choice(templates), rng), rng)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    raise RuntimeError(f"templates too few to draw {count} unique texts from: {templates[0]!r}")


def build_banking77(rng: random.Random) -> dict[str, list[dict[str, object]]]:
    """Rows {text, label id} for train and test; ids index ``BANKING_LABEL_NAMES``."""
    seen: set[str] = set()
    splits: dict[str, list[dict[str, object]]] = {"train": [], "test": []}
    for label, name in enumerate(BANKING_LABEL_NAMES):
        total = BANKING_TRAIN_PER_INTENT + BANKING_TEST_PER_INTENT
        texts = _unique_texts(BANKING_TEMPLATES[name], total, rng, seen)
        splits["train"] += [{"text": t, "label": label} for t in texts[:BANKING_TRAIN_PER_INTENT]]
        splits["test"] += [{"text": t, "label": label} for t in texts[BANKING_TRAIN_PER_INTENT:]]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def _csqa_row(rng: random.Random) -> dict[str, object]:
    category = rng.choice(list(CSQA_CATEGORIES))
    entry = CSQA_CATEGORIES[category]
    concept, x, answer = rng.choice(entry["items"])
    name = rng.choice(NAMES)
    question = rng.choice(entry["templates"]).format(x=x, name=name)
    others = rng.sample([c for c in CSQA_CATEGORIES if c != category], len(CHOICE_LETTERS) - 1)
    texts = [rng.choice(CSQA_CATEGORIES[c]["items"])[2] for c in others]
    position = rng.randrange(len(CHOICE_LETTERS))
    texts.insert(position, answer)
    return {
        "id": f"{rng.getrandbits(128):032x}",
        "question": question,
        "question_concept": concept,
        "choices": {"label": list(CHOICE_LETTERS), "text": texts},
        "answerKey": CHOICE_LETTERS[position],
    }


def build_commonsense_qa(rng: random.Random) -> dict[str, list[dict[str, object]]]:
    """Rows in commonsense_qa's layout; no question repeats across splits."""
    seen: set[str] = set()
    splits: dict[str, list[dict[str, object]]] = {}
    for split, size in CSQA_SPLIT_SIZES.items():
        rows: list[dict[str, object]] = []
        while len(rows) < size:
            row = _csqa_row(rng)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        splits[split] = rows
    for row in splits["test"]:
        row["answerKey"] = ""  # the hub's test split carries no answers
    return splits


def build_text_claims(rng: random.Random) -> list[dict[str, object]]:
    """Rows {idx, Text, Label}, balanced between the two labels, in shuffled order."""
    seen: set[str] = set()
    rows = [(t, CLAIM) for t in _unique_texts(CLAIM_TEMPLATES, CLAIMS_PER_LABEL, rng, seen)]
    rows += [
        (t, NOT_A_CLAIM) for t in _unique_texts(NOT_A_CLAIM_TEMPLATES, CLAIMS_PER_LABEL, rng, seen)
    ]
    rng.shuffle(rows)
    return [{"idx": i, "Text": text, "Label": label} for i, (text, label) in enumerate(rows)]


BANKING77_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=BANKING_LABEL_NAMES)}
)
_MESSAGES = [{"content": datasets.Value("string"), "role": datasets.Value("string")}]
PREFERENCE_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "prompt_id": datasets.Value("string"),
        "chosen": _MESSAGES,
        "rejected": _MESSAGES,
        "score_chosen": datasets.Value("float64"),
        "score_rejected": datasets.Value("float64"),
    }
)
COMMONSENSE_QA_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "question_concept": datasets.Value("string"),
        "choices": {
            "label": datasets.Sequence(datasets.Value("string")),
            "text": datasets.Sequence(datasets.Value("string")),
        },
        "answerKey": datasets.Value("string"),
    }
)


def _topic(intent: str) -> str:
    return intent.lower().replace("_", " ")


def build_preferences(rng: random.Random) -> dict[str, list[dict[str, object]]]:
    """UltraFeedback-binarized rows: a reply on the message's topic beats an off-topic one."""
    seen: set[str] = set()
    splits: dict[str, list[dict[str, object]]] = {}
    for split, size in PREFERENCE_SPLIT_SIZES.items():
        rows = []
        for _ in range(size):
            intent = rng.choice(BANKING_LABEL_NAMES)
            (prompt,) = _unique_texts(BANKING_TEMPLATES[intent], 1, rng, seen)
            wrong = rng.choice([n for n in BANKING_LABEL_NAMES if n != intent])
            good = f"This is about {_topic(intent)}. I will help you with it right away."
            bad = rng.choice(
                [
                    f"This is about {_topic(wrong)}. I will help you with it right away.",
                    "I cannot help with that.",
                ]
            )
            user = {"role": "user", "content": prompt}
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_id": f"{rng.getrandbits(256):064x}",
                    "chosen": [user, {"role": "assistant", "content": good}],
                    "rejected": [user, {"role": "assistant", "content": bad}],
                    "score_chosen": float(rng.choice([8, 9, 10])),
                    "score_rejected": float(rng.choice([2, 3, 4])),
                }
            )
        splits[split] = rows
    return splits


def _write_parquet(rows: list[dict[str, object]], features: datasets.Features, path: Path) -> None:
    columns = {key: [row[key] for row in rows] for key in features}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def write_sample_data(out: Path, seed: int = 0) -> list[Path]:
    """Generate every sample dataset under ``out``; return the files written."""
    written = []
    # One generator per dataset, so editing one dataset's templates leaves the others' rows alone.
    for split, rows in build_banking77(random.Random(f"banking77-{seed}")).items():
        path = out / "banking77" / f"{split}.parquet"
        _write_parquet(rows, BANKING77_FEATURES, path)
        written.append(path)
    for split, rows in build_commonsense_qa(random.Random(f"commonsense_qa-{seed}")).items():
        path = out / "commonsense_qa" / f"{split}.parquet"
        _write_parquet(rows, COMMONSENSE_QA_FEATURES, path)
        written.append(path)
    path = out / "text_claims" / "train.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["idx", "Text", "Label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(build_text_claims(random.Random(f"text_claims-{seed}")))
    written.append(path)
    for split, rows in build_preferences(random.Random(f"ultrafeedback-{seed}")).items():
        path = out / "ultrafeedback" / f"{split}.parquet"
        _write_parquet(rows, PREFERENCE_FEATURES, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same rows")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    for path in write_sample_data(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
