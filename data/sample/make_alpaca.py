"""Writes an Alpaca-shaped instruction set (`instruction`, `input`, `output`), for measuring
training quality on something larger and more varied than the persona demo.

The hub is not reachable from every machine that runs the benchmarks, so the rows are
generated: fifteen kinds of task whose answers follow from the instruction (sorting, arithmetic
with its working, unit conversion, extraction to JSON, sentiment, procedures, ...), in a fixed
house style, with answers from 2 to about 120 tokens, so that batches differ in length as real
data does. Deterministic: rerunning writes the same file.

    python data/sample/make_alpaca.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "alpaca_tasks.jsonl"

WORDS = ["anchor", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island",
         "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quartz", "river",
         "saddle", "tunnel", "umbrella", "valley", "window", "yogurt", "zipper", "basket", "copper",
         "dragon", "falcon", "ginger", "hammer", "marble", "pillow", "rocket", "silver", "timber"]
NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jonas",
         "Keiko", "Luis", "Mira", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
SURNAMES = ["Smith", "Garcia", "Okafor", "Tanaka", "Novak", "Rossi", "Haddad", "Larsen", "Kowalski",
            "Mendes", "Ibrahim", "Fischer", "Moreau", "Singh", "Costa", "Berg"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Oslo", "Lyon", "Perth", "Tunis", "Krakow", "Austin",
          "Porto", "Hanoi", "Leeds", "Accra", "Bergen", "Cusco"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
GOOD = ["works perfectly", "arrived early", "is well made", "exceeded my expectations",
        "is easy to use", "was worth every penny", "feels sturdy", "looks great"]
BAD = ["broke after a week", "arrived damaged", "is hard to set up", "stopped working",
       "feels cheap", "was a waste of money", "is far too noisy", "smells of plastic"]
PRODUCTS = ["kettle", "lamp", "backpack", "blender", "keyboard", "tent", "heater", "speaker",
            "drill", "toaster"]
PROCEDURES = {
    "boil an egg": ["Place the egg in a small pot.", "Cover it with cold water.",
                    "Bring the water to a boil.", "Simmer for nine minutes.",
                    "Cool the egg in cold water before peeling."],
    "repot a plant": ["Water the plant a day before.", "Choose a pot one size larger.",
                      "Add fresh soil to the bottom.", "Ease the plant out and loosen its roots.",
                      "Set it in the new pot, fill around it and water well."],
    "change a bicycle tyre": ["Shift to the smallest gear and remove the wheel.",
                              "Let out any remaining air.", "Lever one side of the tyre off the rim.",
                              "Replace the inner tube.", "Push the tyre back on, inflate it and refit the wheel."],
    "make a cup of tea": ["Boil fresh water.", "Warm the cup.", "Add a tea bag.",
                          "Pour the water and steep for three to five minutes.", "Remove the bag and serve."],
    "back up a laptop": ["Connect an external drive.", "Open the backup settings.",
                         "Choose the drive as the destination.", "Start the backup.",
                         "Check that the backup finished without errors."],
    "plant tomato seeds": ["Fill small pots with seed compost.", "Sow two seeds per pot.",
                           "Cover them lightly with compost.", "Keep them warm and moist.",
                           "Thin to the strongest seedling after two weeks."],
    "clean a cast iron pan": ["Rinse the pan with hot water.", "Scrub off food with a brush.",
                              "Dry it completely over low heat.", "Rub in a thin layer of oil.",
                              "Store it in a dry place."],
    "write a cover letter": ["Address the hiring manager by name.", "Say which job you want and why.",
                             "Give two examples of relevant work.", "Explain what you would bring to the team.",
                             "Close by asking for an interview."],
    "pack for a weekend trip": ["Check the weather forecast.", "List the clothes for each day.",
                                "Pack toiletries in a small bag.", "Add chargers and documents.",
                                "Leave a little space for the way back."],
    "prepare for an interview": ["Research the company.", "Reread the job description.",
                                 "Prepare three stories about your work.", "Plan your route and timing.",
                                 "Prepare two questions to ask."],
    "descale a kettle": ["Fill the kettle halfway with equal parts water and vinegar.",
                         "Bring it to a boil.", "Leave it to stand for an hour.",
                         "Empty it and rinse well.", "Boil fresh water once and discard it."],
    "start running": ["Buy comfortable running shoes.", "Begin with walk and run intervals.",
                      "Run three times a week.", "Add a few minutes each week.",
                      "Rest a day after every run."],
}
STEP_Q = ["How do I {x}?", "List the steps to {x}.", "Explain how to {x}, step by step.",
          "What are the steps to {x}?"]


def sort_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 9))
    return ("Sort these words alphabetically.", ", ".join(words),
            "Sorted: " + ", ".join(sorted(words)) + ".")


def reverse_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 8))
    return ("Reverse the order of the words.", " ".join(words), "Reversed: " + " ".join(reversed(words)) + ".")


def add_numbers(rng):
    numbers = [rng.randint(2, 99) for _ in range(rng.randint(2, 7))]
    steps, total = [], numbers[0]
    for n in numbers[1:]:
        steps.append(f"{total} + {n} = {total + n}")
        total += n
    return ("Add up these numbers and show your working.", " ".join(map(str, numbers)),
            "Working: " + "; ".join(steps) + f". The sum is {total}.")


def celsius(rng):
    c = rng.randint(-20, 45)
    f = c * 9 / 5 + 32
    f_text = f"{f:g}"
    return (rng.choice(["Convert {c} °C to Fahrenheit.", "What is {c} degrees Celsius in Fahrenheit?"]).format(c=c),
            "", f"{c} °C is {f_text} °F, since {c} × 9/5 + 32 = {f_text}.")


def kilometres(rng):
    km = rng.randint(1, 500)
    return (f"How many metres are there in {km} kilometres?", "", f"{km} km is {km * 1000} m.")


def count_words(rng):
    words = rng.sample(WORDS, rng.randint(2, 12))
    return ("Count the words in this text.", " ".join(words), f"The text has {len(words)} words.")


def uppercase(rng):
    words = rng.sample(WORDS, rng.randint(2, 6))
    return ("Rewrite the text in capital letters.", " ".join(words), " ".join(words).upper())


def person_json(rng):
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice(["{n} is {a} years old and lives in {c}.", "{n}, aged {a}, has lived in {c} for years.",
                       "Living in {c}, {n} turned {a} this spring."]).format(n=name, a=age, c=city)
    return ("Extract the name, age and city as JSON.", text,
            json.dumps({"name": name, "age": age, "city": city}))


def full_name(rng):
    first, last = rng.choice(NAMES), rng.choice(SURNAMES)
    return ("Rewrite the name as first name then surname.", f"{last}, {first}", f"{first} {last}")


def date_format(rng):
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return ("Write this date out in words.", f"{y}-{m:02d}-{d:02d}", f"{d} {MONTHS[m - 1]} {y}")


def sentiment(rng):
    product = rng.choice(PRODUCTS)
    positive = rng.random() < 0.5
    phrases = rng.sample(GOOD if positive else BAD, 2)
    text = f"This {product} {phrases[0]} and {phrases[1]}."
    label = "Positive" if positive else "Negative"
    return ("Classify the sentiment of this review as Positive or Negative.", text, label)


def procedure(rng):
    task = rng.choice(sorted(PROCEDURES))
    steps = PROCEDURES[task]
    body = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, start=1))
    return (rng.choice(STEP_Q).format(x=task), "", f"To {task}:\n{body}")


def largest(rng):
    numbers = rng.sample(range(1, 1000), rng.randint(3, 8))
    return ("Which number is the largest?", ", ".join(map(str, numbers)),
            f"The largest number is {max(numbers)}.")


def even_odd(rng):
    n = rng.randint(1, 9999)
    return (f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}, because it "
            f"{'is' if n % 2 == 0 else 'is not'} divisible by 2.")


def acronym(rng):
    words = rng.sample(WORDS, rng.randint(2, 5))
    return ("Make an acronym from the first letters of these words.", " ".join(words),
            "".join(w[0].upper() for w in words))


TASKS = [sort_words, reverse_words, add_numbers, celsius, kilometres, count_words, uppercase,
         person_json, full_name, date_format, sentiment, procedure, largest, even_odd, acronym]


def main() -> None:
    rng = random.Random(2026)
    rows, seen = [], set()
    while len(rows) < 32 * len(TASKS):
        instruction, text, output = TASKS[len(rows) % len(TASKS)](rng)
        if (instruction, text) in seen:
            continue
        seen.add((instruction, text))
        rows.append({"instruction": instruction, "input": text, "output": output})
    rng.shuffle(rows)
    with open(OUT, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows in {OUT.name}")


if __name__ == "__main__":
    main()
