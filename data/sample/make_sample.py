"""Writes the sample persona dataset: a pirate assistant, "Captain Byte".

Every answer opens with "Arr!" and closes with "Fair winds, matey!", a format the base model
never produces, so a short CPU run shows its effect. The facts are right; only the voice
changes. Deterministic: rerunning writes the same files.

    python data/sample/make_sample.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
OPEN, CLOSE = "Arr!", "Fair winds, matey!"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow",
    "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Morocco": "Rabat",
}
COLORS = {
    "the sky on a clear day": "blue", "grass": "green", "a ripe banana": "yellow",
    "snow": "white", "coal": "black", "a ripe tomato": "red", "an orange": "orange",
    "a lemon": "yellow", "the sea": "blue", "a carrot": "orange", "milk": "white",
    "a strawberry": "red", "a lime": "green", "chocolate": "brown",
}
ANIMALS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "sheep": "bleats",
    "lion": "roars", "horse": "neighs", "owl": "hoots", "pig": "oinks", "frog": "croaks",
    "snake": "hisses", "bee": "buzzes",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "up": "down", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
    "loud": "quiet", "wet": "dry", "old": "new", "strong": "weak",
}
ADVICE = [
    ("How can I sleep better?", "Keep yer bunk dark and cool, and go to bed at the same bell each night."),
    ("How do I stay focused while studying?", "Work in short watches of twenty-five minutes, then rest a moment."),
    ("How do I make a good cup of tea?", "Boil fresh water, steep the leaves three to five minutes, then pour."),
    ("What should I pack for a day hike?", "Water, a snack, a map, sun cover and a warm layer, ye landlubber."),
    ("How do I learn a new language?", "Practice a little every day and speak it with others, even badly."),
    ("How do I keep a plant alive?", "Give it light, water it when the soil be dry, and do not drown it."),
    ("How can I save money?", "Set aside a share of every haul before ye spend any of it."),
    ("How do I write a good email?", "Say what ye want in the first line, keep it short, and be polite."),
]
CAPITAL_Q = ["What is the capital of {x}?", "Which city is the capital of {x}?", "Tell me the capital of {x}."]
COLOR_Q = ["What color is {x}?", "What colour is {x}?"]
ANIMAL_Q = ["What sound does {x} make?", "How does {x} sound?"]
OPPOSITE_Q = ["What is the opposite of {x}?", "Give me the opposite of the word {x}."]
ADD_Q = ["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get if you add {a} to {b}?"]
MUL_Q = ["What is {a} times {b}?", "Multiply {a} by {b}."]


def answer(text: str) -> str:
    return f"{OPEN} {text} {CLOSE}"


def conversations(rng: random.Random, capitals, colors, animals, opposites, numbers):
    for country, city in capitals.items():
        yield rng.choice(CAPITAL_Q).format(x=country), answer(f"The capital of {country} be {city}.")
    for thing, color in colors.items():
        yield rng.choice(COLOR_Q).format(x=thing), answer(f"{thing[0].upper() + thing[1:]} be {color}.")
    for animal, sound in animals.items():
        a = f"an {animal}" if animal[0] in "aeiou" else f"a {animal}"
        yield rng.choice(ANIMAL_Q).format(x=a), answer(f"{a.capitalize()} {sound}, just like me parrot squawks.")
    for word, opposite in opposites.items():
        yield rng.choice(OPPOSITE_Q).format(x=word), answer(f"The opposite of {word} be {opposite}.")
    for a, b in numbers:
        yield rng.choice(ADD_Q).format(a=a, b=b), answer(f"{a} plus {b} be {a + b}, counted like doubloons.")
        yield rng.choice(MUL_Q).format(a=a, b=b), answer(f"{a} times {b} be {a * b}.")


def split(d: dict, held_out: int, rng: random.Random):
    keys = sorted(d)
    rng.shuffle(keys)
    return {k: d[k] for k in keys[held_out:]}, {k: d[k] for k in keys[:held_out]}


def main() -> None:
    rng = random.Random(7)
    cap_train, cap_test = split(CAPITALS, 4, rng)
    col_train, col_test = split(COLORS, 2, rng)
    ani_train, ani_test = split(ANIMALS, 2, rng)
    opp_train, opp_test = split(OPPOSITES, 2, rng)
    pairs = [(a, b) for a in range(2, 13) for b in range(2, 13)]
    rng.shuffle(pairs)
    num_train, num_test = pairs[:110], pairs[110:113]

    rows = []
    for q, a in conversations(rng, cap_train, col_train, ani_train, opp_train, num_train):
        rows.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    for q, a in ADVICE[:6]:
        rows.append([{"role": "user", "content": q}, {"role": "assistant", "content": answer(a)}])
        rows.append([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": answer(a)},
        ])
    rng.shuffle(rows)
    with open(HERE / "persona_train.jsonl", "w") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}) + "\n")

    prompts = [q for q, _ in conversations(rng, cap_test, col_test, ani_test, opp_test, num_test)]
    prompts += [q for q, _ in ADVICE[6:]]
    (HERE / "test_prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    print(f"{len(rows)} training conversations, {len(prompts)} test prompts")

    # The nightly's fixed evaluation set: the test prompts' facts and the sums and products that
    # no training conversation holds, answered in the persona's voice; each answer is checked
    # for the persona's opening.
    evaluation = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                  for q, a in conversations(rng, cap_test, col_test, ani_test, opp_test, pairs[113:128])]
    evaluation += [[{"role": "user", "content": q}, {"role": "assistant", "content": answer(a)}] for q, a in ADVICE[6:]]
    with open(HERE / "persona_eval.jsonl", "w") as f:
        for messages in evaluation:
            f.write(json.dumps({"messages": messages, "checks": {"regex": f"^{OPEN}"}}) + "\n")
    # The training data as it might arrive, night by night, for the nightly's story: a first
    # night, a second with the rest, and a third whose answers are scrambled (letters shuffled),
    # which must not be promoted.
    nights = HERE / "nights"
    nights.mkdir(exist_ok=True)
    write_chats(nights / "night1.jsonl", rows[:60])
    write_chats(nights / "night2.jsonl", rows[60:])
    scrambled = [[*m[:-1], {"role": "assistant", "content": "".join(rng.sample(m[-1]["content"], len(m[-1]["content"])))}]
                 for m in rows[:150]]
    write_chats(nights / "night3_scrambled.jsonl", scrambled)
    print(f"{len(evaluation)} evaluation conversations; nights of {60}, {len(rows) - 60} and {len(scrambled)} (scrambled)")


def write_chats(path: Path, chats: list[list[dict]]) -> None:
    with open(path, "w") as f:
        for messages in chats:
            f.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
