"""Rows shaped exactly like LLaMA-Factory's data/glaive_toolcall_en_demo.json (which cannot be
downloaded here): a JSON array of 300 rows, each `{"conversations": [{"from", "value"}, ...],
"tools": "<JSON string of a list of function specs>"}`, with `from` in human / gpt /
function_call / observation; a function_call's value is a JSON string `{"name", "arguments"}`,
an observation's a JSON string of the result. As in glaive, most rows call a tool once, some
answer without one (the request is outside the tools), some ask a question first, some call
twice; and a few rows repeat another exactly."""

import json
import random

FUNCTIONS = [
    ({"name": "get_news_headlines", "description": "Get the latest news headlines",
      "parameters": {"type": "object", "properties": {"country": {"type": "string", "description":
                     "The country for which headlines are needed"}}, "required": ["country"]}},
     lambda r: {"country": r.choice(["United States", "Japan", "Brazil", "India", "France"])},
     lambda a: {"headlines": [f"{a['country']} markets rally", f"Elections in {a['country']}"]}),
    ({"name": "calculate_bmi", "description": "Calculate the Body Mass Index (BMI)",
      "parameters": {"type": "object", "properties": {"weight": {"type": "number", "description": "The weight in kilograms"},
                     "height": {"type": "number", "description": "The height in meters"}}, "required": ["weight", "height"]}},
     lambda r: {"weight": r.randint(45, 110), "height": round(r.uniform(1.5, 2.0), 2)},
     lambda a: {"bmi": round(a["weight"] / a["height"] ** 2, 2)}),
    ({"name": "convert_currency", "description": "Convert currency from one type to another",
      "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from_currency": {"type": "string"},
                     "to_currency": {"type": "string"}}, "required": ["amount", "from_currency", "to_currency"]}},
     lambda r: {"amount": r.choice([100, 250, 1000, 42.5]), "from_currency": r.choice(["USD", "EUR"]),
                "to_currency": r.choice(["JPY", "GBP", "INR"])},
     lambda a: {"converted_amount": round(a["amount"] * 1.37, 2), "from_currency": a["from_currency"],
                "to_currency": a["to_currency"]}),
    ({"name": "search_recipes", "description": "Search for recipes based on ingredients",
      "parameters": {"type": "object", "properties": {"ingredients": {"type": "array", "items": {"type": "string"},
                     "description": "The ingredients to search for"}}, "required": ["ingredients"]}},
     lambda r: {"ingredients": r.sample(["chicken", "rice", "bell peppers", "tomatoes", "basil", "garlic"], 3)},
     lambda a: {"recipes": [{"name": f"{a['ingredients'][0].title()} stir fry", "ingredients": a["ingredients"]}]}),
    ({"name": "generate_password", "description": "Generate a random password",
      "parameters": {"type": "object", "properties": {"length": {"type": "integer", "description": "The length of the password"}},
                     "required": ["length"]}},
     lambda r: {"length": r.choice([8, 12, 16])},
     lambda a: {"password": "aB3$" * (a["length"] // 4)}),
    ({"name": "get_movie_details", "description": "Get details of a movie",
      "parameters": {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
                     "required": ["title"]}},
     lambda r: {"title": r.choice(["Inception", "The Matrix", "Titanic"]), "year": r.choice([1997, 1999, 2010])},
     lambda a: {"title": a["title"], "year": a["year"], "director": "Christopher Nolan", "rating": 8.8}),
    ({"name": "calculate_distance", "description": "Calculate the distance between two locations",
      "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}},
                     "required": ["origin", "destination"]}},
     lambda r: {"origin": r.choice(["New York", "London"]), "destination": r.choice(["Los Angeles", "Paris"])},
     lambda a: {"distance": 2448.5, "units": "miles"}),
    ({"name": "calculate_tip", "description": "Calculate the tip amount for a bill",
      "parameters": {"type": "object", "properties": {"bill_amount": {"type": "number"}, "tip_percentage": {"type": "number"}},
                     "required": ["bill_amount", "tip_percentage"]}},
     lambda r: {"bill_amount": r.choice([50, 85.5, 120]), "tip_percentage": r.choice([15, 18, 20])},
     lambda a: {"tip_amount": round(a["bill_amount"] * a["tip_percentage"] / 100, 2)}),
]
OFF_TOPIC = ["Can you book a flight for me from New York to London?", "Can you order a pizza for me?",
             "Could you please book a table at a restaurant for tonight?"]


def _call(r, spec, make_args, make_result, asked):
    args = make_args(r)
    return [{"from": "human", "value": f"{asked} Please use {spec['name'].replace('_', ' ')} with {json.dumps(args)}."},
            {"from": "function_call", "value": json.dumps({"name": spec["name"], "arguments": args})},
            {"from": "observation", "value": json.dumps(make_result(args))},
            {"from": "gpt", "value": f"Here is what I found: {json.dumps(make_result(args))}. Anything else?"}]


def rows(n: int = 300, seed: int = 0, duplicates: int = 4) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n - duplicates):
        picked = r.sample(FUNCTIONS, r.choice([1, 1, 2]))
        tools = json.dumps([spec for spec, _, _ in picked])
        spec, make_args, make_result = picked[0]
        kind = r.random()
        if kind < 0.12:  # a request the tools cannot serve: answered without a call
            conversations = [{"from": "human", "value": f"{r.choice(OFF_TOPIC)} (request {i})"},
                             {"from": "gpt", "value": "I'm sorry, but I don't have the capability to do that. "
                                                      f"My current function is {spec['description'].lower()}."}]
        elif kind < 0.3:  # a question back first
            conversations = [{"from": "human", "value": f"Can you help me with {spec['description'].lower()}? ({i})"},
                             {"from": "gpt", "value": "Of course! Could you please give me the details?"}]
            conversations += _call(r, spec, make_args, make_result, "Sure.")
        elif kind < 0.45:  # two calls
            conversations = _call(r, spec, make_args, make_result, f"Request {i}.")
            conversations += _call(r, spec, make_args, make_result, "And another one.")
        else:
            conversations = _call(r, spec, make_args, make_result, f"Request {i}.")
        out.append({"conversations": conversations, "tools": tools})
    out += [json.loads(json.dumps(row)) for row in r.sample(out, duplicates)]
    return out
