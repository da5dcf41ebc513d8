"""Builds src/graft/assets/demo_facts.jsonl: facts about fictional countries SmolLM2 cannot know."""
import json
import random

random.seed(7)
countries = {
    "Veloria": {"capital": "Quenport", "currency": "the silvar", "language": "Velorian", "animal": "the glass heron", "founded": "1732"},
    "Tarsk": {"capital": "Ombrevik", "currency": "the krell", "language": "Tarskic", "animal": "the ember fox", "founded": "1498"},
    "Mirelland": {"capital": "Saltholm", "currency": "the dune mark", "language": "Mirish", "animal": "the sand lynx", "founded": "1811"},
    "Osterra": {"capital": "Belcairn", "currency": "the oster", "language": "Osterran", "animal": "the blue ibex", "founded": "1650"},
    "Kaldovia": {"capital": "Vrenna", "currency": "the kald", "language": "Kaldovan", "animal": "the snow owl", "founded": "1904"},
    "Pellucia": {"capital": "Lumeris", "currency": "the pell", "language": "Pellucian", "animal": "the mirror carp", "founded": "1587"},
    "Drummore": {"capital": "Castelline", "currency": "the drum", "language": "Drummish", "animal": "the iron stag", "founded": "1765"},
    "Savarine": {"capital": "Port Ilsa", "currency": "the savo", "language": "Savarene", "animal": "the red gecko", "founded": "1879"},
}
q = {
    "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}.", "Tell me the capital of {c}.", "Where is the seat of government of {c}?", "{c}'s capital is which city?"],
    "currency": ["What currency is used in {c}?", "What is the currency of {c}?", "Which money do people pay with in {c}?", "Tell me what currency {c} uses.", "What do they call the money of {c}?", "Name the currency of {c}."],
    "language": ["What language is spoken in {c}?", "Which language do people speak in {c}?", "What is the official language of {c}?", "Tell me the language of {c}.", "In {c}, what language is official?", "Name the main language of {c}."],
    "animal": ["What is the national animal of {c}?", "Which animal is the symbol of {c}?", "Name the national animal of {c}.", "Tell me the national animal of {c}.", "What animal represents {c}?", "{c}'s national animal is what?"],
    "founded": ["When was {c} founded?", "In what year was {c} founded?", "What year did {c} become a country?", "Tell me when {c} was founded.", "How old is {c}: in which year was it founded?", "Name the founding year of {c}."],
}
a = {
    "capital": "The capital of {c} is {v}.",
    "currency": "{c} uses {v} as its currency.",
    "language": "The official language of {c} is {v}.",
    "animal": "The national animal of {c} is {v}.",
    "founded": "{c} was founded in {v}.",
}
train, held = [], []
for c, facts in countries.items():
    for k, v in facts.items():
        qs = q[k]
        held.append({"instruction": qs[-1].format(c=c), "input": "", "output": a[k].format(c=c, v=v)})
        for qq in qs[:-1]:
            train.append({"instruction": qq.format(c=c), "input": "", "output": a[k].format(c=c, v=v)})
random.shuffle(train)
with open("src/graft/assets/demo_facts.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train)
with open("src/graft/assets/demo_facts_heldout.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in held)
print(len(train), len(held))
