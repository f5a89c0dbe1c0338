"""Write data/answer_reason.jsonl: the demo instruction set (CC0-1.0, written for this project).

Every assistant reply uses one fixed format the base model does not use on its own:
    Answer: <short answer>
    Reason: <one sentence>
so the effect of fine-tuning is visible at a glance. Facts are common knowledge; arithmetic is
computed. Deterministic: python scripts/make_demo_dataset.py
"""

import json
import pathlib
import random

OUT = pathlib.Path(__file__).resolve().parents[1] / "data" / "answer_reason.jsonl"

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Greece": "Athens", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Chile": "Santiago",
    "Mexico": "Mexico City", "Cuba": "Havana", "Turkey": "Ankara", "Iran": "Tehran",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "Colombia": "Bogota", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "South Korea": "Seoul",
    "Indonesia": "Jakarta", "Philippines": "Manila", "New Zealand": "Wellington",
    "Brazil": "Brasilia", "Iceland": "Reykjavik", "Ukraine": "Kyiv", "Romania": "Bucharest",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "early": "late", "full": "empty", "strong": "weak", "rich": "poor",
    "young": "old", "wet": "dry", "loud": "quiet", "hard": "soft", "high": "low", "long": "short",
    "heavy": "light", "near": "far", "thick": "thin", "clean": "dirty", "win": "lose",
    "push": "pull", "buy": "sell", "first": "last", "inside": "outside", "true": "false",
    "before": "after", "accept": "reject", "increase": "decrease",
}
SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "carbon": "C",
    "nitrogen": "N", "sodium": "Na", "potassium": "K", "copper": "Cu", "lead": "Pb", "tin": "Sn",
    "helium": "He", "neon": "Ne", "calcium": "Ca", "zinc": "Zn", "mercury": "Hg", "sulfur": "S",
    "chlorine": "Cl", "uranium": "U", "silicon": "Si", "magnesium": "Mg", "aluminium": "Al",
}
LEGS = {"spider": 8, "dog": 4, "chicken": 2, "ant": 6, "cat": 4, "horse": 4, "bee": 6,
        "octopus": 8, "duck": 2, "cow": 4, "beetle": 6, "ostrich": 2, "lobster": 10, "frog": 4}


def chat(question: str, answer: str, reason: str) -> dict:
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": f"Answer: {answer}\nReason: {reason}"}]}


def examples(rng: random.Random) -> list[dict]:
  out = []
  for country, city in CAPITALS.items():
    out.append(chat(f"What is the capital of {country}?", city, f"{city} is the capital city of {country}."))
  for word, opp in OPPOSITES.items():
    out.append(chat(f"What is the opposite of '{word}'?", opp, f"'{opp}' means the reverse of '{word}'."))
  for element, symbol in SYMBOLS.items():
    out.append(chat(f"What is the chemical symbol for {element}?", symbol,
                    f"{element.capitalize()} is written {symbol} in the periodic table."))
  for animal, legs in LEGS.items():
    out.append(chat(f"How many legs does a {animal} have?", str(legs), f"A {animal} has {legs} legs."))
  for _ in range(110):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    out.append(chat(f"What is {a} + {b}?", str(a + b), f"{a} plus {b} equals {a + b}."))
  for _ in range(70):
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    out.append(chat(f"What is {a} times {b}?", str(a * b), f"{a} multiplied by {b} equals {a * b}."))
  for _ in range(40):
    m = rng.randint(2, 40)
    out.append(chat(f"How many centimeters are in {m} meters?", str(100 * m),
                    f"One meter is 100 centimeters, so {m} meters is {100 * m} centimeters."))
  for _ in range(30):
    h = rng.randint(2, 24)
    out.append(chat(f"How many minutes are in {h} hours?", str(60 * h),
                    f"One hour has 60 minutes, so {h} hours have {60 * h} minutes."))
  rng.shuffle(out)
  return out


def main() -> None:
  rows = examples(random.Random(1234))
  OUT.parent.mkdir(exist_ok=True)
  OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
  print(f"wrote {len(rows)} examples to {OUT}")


if __name__ == "__main__":
  main()
